//! The scenarios, as data. A prompt containing `SCENARIO:<name>` picks one; anything else gets
//! [`PLAIN`]. One engine (`engine.rs`) interprets every scenario, so adding one means adding an
//! entry here, not a code path in the server. Delays are milliseconds at `time_scale` 1.
//! docs/sim.md tells each scenario's timeline.

/// The marker a prompt carries to pick a scenario: `SCENARIO:bg-child`.
pub const MARKER: &str = "SCENARIO:";
/// The scenario of a prompt without a marker.
pub const PLAIN: &str = "plain";

/// A scripted conversation.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: &'static str,
    pub summary: &'static str,
    /// The agent answering the prompted session.
    pub root: Agent,
    /// A plugin's actions, run beside the root from the prompt on (oh-my-opencode's poller).
    pub plugin: Vec<PluginStep>,
}

/// How one session behaves.
#[derive(Debug, Clone)]
pub struct Agent {
    /// The agent name reported on messages (`build`, `general`, `Sisyphus-Junior`, …).
    pub agent: &'static str,
    /// Time between the session's first user message and its loop going busy: the session
    /// exists but is missing from `GET /session/status` meanwhile.
    pub start_delay_ms: u64,
    /// Turn 0 answers the first prompt; turn k answers the k-th later user message (injected
    /// results, plugin wakes) in arrival order. Past the end: a short "noted" answer.
    pub turns: Vec<Vec<Step>>,
}

/// One step of a turn. A turn's assistant messages follow the runtime: each tool step ends a
/// message with `finish: "tool-calls"` and opens the next; `Say` and `Fail` end the turn.
#[derive(Debug, Clone)]
pub enum Step {
    /// Work that shows nothing (the model thinking, a tool running).
    Think(u64),
    /// Status `retry` for a while, then `busy` again.
    Retry {
        attempt: u32,
        message: &'static str,
        ms: u64,
    },
    /// A finished text part in the open message; the turn goes on.
    Partial(&'static str),
    /// The last text of the turn: `finish: "stop"`.
    Say(&'static str),
    /// The turn ends with an assistant `error` (`APIError`).
    Fail(&'static str),
    /// A `task` tool call starting a child session.
    Launch(Launch),
    /// oh-my-opencode's `background_output(block=true)`: running for `hold_ms`, then completed
    /// with a `Task Result` built from the child's latest text, whatever the child's state.
    BackgroundOutput { label: &'static str, hold_ms: u64 },
}

/// A child session started by a `task` call.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Names the child within the scenario (for `BackgroundOutput`, plugin aborts).
    pub label: &'static str,
    pub description: &'static str,
    pub prompt: &'static str,
    pub style: Launching,
    pub child: Agent,
    /// Native background only: time between the child's loop ending and the runtime injecting
    /// its result into the parent.
    pub inject_delay_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launching {
    /// `task` with `background: true` (1.18): completed at once with `state="running"`; the
    /// runtime injects `<task … state="completed|error">` into the parent when the child's
    /// first loop ends (nothing if it was aborted).
    Background,
    /// `task` without background: running until the child's loop ends.
    Foreground,
    /// oh-my-opencode's `task(run_in_background=true)`: launch text with `<task_metadata>`;
    /// no runtime injection (the plugin wakes the parent itself).
    OmoBackground,
}

/// A plugin action, beside the root's turns.
#[derive(Debug, Clone)]
pub enum PluginStep {
    /// Wait for the root's first loop to end.
    AfterRootIdle,
    Wait(u64),
    /// Abort the labelled child session, as the plugin does when it thinks the task completed.
    Abort(&'static str),
    /// A plugin-made user message into the root; `{tasks}` becomes a list of the launched
    /// `bg_…` ids. The root answers it with its next turn.
    Wake(&'static str),
}

/// The scenario a prompt picks: the first `SCENARIO:<name>` marker naming a known scenario.
pub fn pick(prompt: &str) -> Scenario {
    let all = all();
    prompt
        .match_indices(MARKER)
        .filter_map(|(at, _)| {
            let name: String = prompt[at + MARKER.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect();
            all.iter().find(|s| s.name == name).cloned()
        })
        .next()
        .unwrap_or_else(plain)
}

/// Every scenario, in the order docs/sim.md lists them.
pub fn all() -> Vec<Scenario> {
    vec![
        plain(),
        bg_child(),
        bg_two(),
        bg_three(),
        grandchild(),
        fg_child(),
        omo(),
        child_fail(),
        child_abort(),
        retry(),
        late_inject(),
        status_missing(),
    ]
}

fn agent(name: &'static str, turns: Vec<Vec<Step>>) -> Agent {
    Agent {
        agent: name,
        start_delay_ms: 0,
        turns,
    }
}

/// A `general` child that works `ms` then answers `text`.
fn worker(ms: u64, text: &'static str) -> Agent {
    agent("general", vec![vec![Step::Think(ms), Step::Say(text)]])
}

fn launch(label: &'static str, style: Launching, child: Agent) -> Step {
    Step::Launch(Launch {
        label,
        description: label,
        prompt: "CHILD-WORK do the thing",
        style,
        child,
        inject_delay_ms: 0,
    })
}

fn plain() -> Scenario {
    Scenario {
        name: PLAIN,
        summary: "no child: the parent answers at once (control)",
        root: agent(
            "build",
            vec![vec![
                Step::Think(200),
                Step::Say("FINAL: plain answer, no child"),
            ]],
        ),
        plugin: vec![],
    }
}

/// The recorded parent: one launch, "launched, ending my turn", then the answer to the
/// injected result.
fn parent_of(launch: Step) -> Agent {
    agent(
        "build",
        vec![
            vec![
                Step::Think(100),
                launch,
                Step::Say("launched, ending my turn"),
            ],
            vec![
                Step::Think(100),
                Step::Say("FINAL: parent got the child result"),
            ],
        ],
    )
}

fn bg_child() -> Scenario {
    Scenario {
        name: "bg-child",
        summary: "one native background child works 3 s after the parent went idle",
        root: agent(
            "build",
            vec![
                vec![
                    Step::Think(100),
                    launch(
                        "child job",
                        Launching::Background,
                        worker(3000, "child finished the work"),
                    ),
                    Step::Think(100),
                    Step::Say("launched, ending my turn"),
                ],
                vec![
                    Step::Think(100),
                    Step::Say("FINAL: parent got the child result"),
                ],
            ],
        ),
        plugin: vec![],
    }
}

fn bg_two() -> Scenario {
    Scenario {
        name: "bg-two",
        summary: "two background children; the second launched finishes first",
        root: agent(
            "build",
            vec![
                vec![
                    Step::Think(100),
                    launch(
                        "slow job",
                        Launching::Background,
                        worker(3500, "slow child done"),
                    ),
                    launch(
                        "quick job",
                        Launching::Background,
                        worker(2000, "quick child done"),
                    ),
                    Step::Say("launched two, ending my turn"),
                ],
                vec![Step::Think(100), Step::Say("noted the first result")],
                vec![Step::Think(100), Step::Say("FINAL: both children reported")],
            ],
        ),
        plugin: vec![],
    }
}

fn bg_three() -> Scenario {
    Scenario {
        name: "bg-three",
        summary: "three background children finishing in the order 3, 1, 2",
        root: agent(
            "build",
            vec![
                vec![
                    Step::Think(100),
                    launch("job one", Launching::Background, worker(2500, "one done")),
                    launch("job two", Launching::Background, worker(3500, "two done")),
                    launch(
                        "job three",
                        Launching::Background,
                        worker(1500, "three done"),
                    ),
                    Step::Say("launched three, ending my turn"),
                ],
                vec![Step::Think(100), Step::Say("noted one result")],
                vec![Step::Think(100), Step::Say("noted two results")],
                vec![
                    Step::Think(100),
                    Step::Say("FINAL: all three children reported"),
                ],
            ],
        ),
        plugin: vec![],
    }
}

fn grandchild() -> Scenario {
    let child = agent(
        "general",
        vec![
            vec![
                Step::Think(200),
                launch(
                    "grandchild job",
                    Launching::Background,
                    worker(3000, "grandchild finished"),
                ),
                Step::Say("partial: my grandchild's result is not in yet"),
            ],
            vec![
                Step::Think(100),
                Step::Say("child final answer with the grandchild's result"),
            ],
        ],
    );
    Scenario {
        name: "grandchild",
        summary: "a child launches a grandchild and goes idle; its result is injected early",
        root: parent_of(launch("child job", Launching::Background, child)),
        plugin: vec![],
    }
}

fn fg_child() -> Scenario {
    Scenario {
        name: "fg-child",
        summary: "a foreground child: the task part runs until the child ends (control)",
        root: agent(
            "build",
            vec![vec![
                Step::Think(100),
                launch(
                    "child job",
                    Launching::Foreground,
                    worker(1500, "child finished the work"),
                ),
                Step::Think(100),
                Step::Say("FINAL: parent got the child result"),
            ]],
        ),
        plugin: vec![],
    }
}

fn omo() -> Scenario {
    let child = agent(
        "Sisyphus-Junior",
        vec![vec![
            Step::Think(200),
            Step::Partial("partial: still working on it"),
            Step::Think(4000),
            Step::Say("child finished the work"),
        ]],
    );
    Scenario {
        name: "omo",
        summary: "oh-my-opencode: a premature background_output Task Result, then the plugin aborts the busy child",
        root: agent(
            "Sisyphus",
            vec![
                vec![
                    Step::Think(100),
                    Step::Launch(Launch {
                        label: "child task",
                        description: "child task",
                        prompt: "CHILD-WORK do the thing",
                        style: Launching::OmoBackground,
                        child,
                        inject_delay_ms: 0,
                    }),
                    Step::Think(300),
                    Step::BackgroundOutput {
                        label: "child task",
                        hold_ms: 500,
                    },
                    Step::Say("The child reported its result; done."),
                ],
                vec![
                    Step::Think(100),
                    Step::Say("FINAL: all background tasks complete"),
                ],
            ],
        ),
        plugin: vec![
            PluginStep::AfterRootIdle,
            PluginStep::Wait(1000),
            PluginStep::Abort("child task"),
            PluginStep::Wait(300),
            PluginStep::Wake(
                "[ALL BACKGROUND TASKS COMPLETE]\n\n**Completed:**\n{tasks}\n\nUse `background_output(task_id=\"<id>\")` to retrieve each result.\n<!-- OMO_INTERNAL_INITIATOR -->",
            ),
        ],
    }
}

fn child_fail() -> Scenario {
    Scenario {
        name: "child-fail",
        summary: "the background child fails with APIError; an error result is injected",
        root: agent(
            "build",
            vec![
                vec![
                    Step::Think(100),
                    launch(
                        "child job",
                        Launching::Background,
                        agent(
                            "general",
                            vec![vec![
                                Step::Think(2500),
                                Step::Fail("Rate limit exceeded, retries exhausted"),
                            ]],
                        ),
                    ),
                    Step::Say("launched, ending my turn"),
                ],
                vec![
                    Step::Think(100),
                    Step::Say("FINAL: the child failed, reporting the error"),
                ],
            ],
        ),
        plugin: vec![],
    }
}

fn child_abort() -> Scenario {
    Scenario {
        name: "child-abort",
        summary:
            "a long background child meant to be aborted by the user (POST /session/:child/abort)",
        root: parent_of(launch(
            "child job",
            Launching::Background,
            worker(6000, "child finished the work"),
        )),
        plugin: vec![],
    }
}

fn retry() -> Scenario {
    Scenario {
        name: "retry",
        summary: "the background child spends 1.5 s in status retry in the middle of its work",
        root: parent_of(launch(
            "child job",
            Launching::Background,
            agent(
                "general",
                vec![vec![
                    Step::Think(800),
                    Step::Retry {
                        attempt: 2,
                        message: "Provider is overloaded",
                        ms: 1500,
                    },
                    Step::Think(800),
                    Step::Say("child finished the work after a retry"),
                ]],
            ),
        )),
        plugin: vec![],
    }
}

fn late_inject() -> Scenario {
    Scenario {
        name: "late-inject",
        summary: "the child goes idle; its result reaches the parent 2 s later",
        root: parent_of(Step::Launch(Launch {
            label: "child job",
            description: "child job",
            prompt: "CHILD-WORK do the thing",
            style: Launching::Background,
            child: worker(1500, "child finished the work"),
            inject_delay_ms: 2000,
        })),
        plugin: vec![],
    }
}

fn status_missing() -> Scenario {
    Scenario {
        name: "status-missing",
        summary: "the child exists but is absent from /session/status for 2 s before going busy",
        root: parent_of(launch(
            "child job",
            Launching::Background,
            Agent {
                agent: "general",
                start_delay_ms: 2000,
                turns: vec![vec![
                    Step::Think(1500),
                    Step::Say("child finished the work"),
                ]],
            },
        )),
        plugin: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_picks_its_scenario_and_anything_else_is_plain() {
        assert_eq!(pick("please SCENARIO:bg-two now").name, "bg-two");
        assert_eq!(pick("SCENARIO:omo").name, "omo");
        assert_eq!(pick("SCENARIO:nope then SCENARIO:retry").name, "retry");
        assert_eq!(pick("hello").name, PLAIN);
        assert_eq!(pick("SCENARIO:bg-child-extra").name, PLAIN);
    }

    #[test]
    fn scenario_names_are_unique() {
        let all = all();
        let mut names: Vec<_> = all.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len());
    }
}
