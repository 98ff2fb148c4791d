//! Linking: which session an oh-my-opencode `bg_…` id stands for. Learnt from launches (the
//! plugin's launch results and the part metadata the runtime records), the latest launch
//! winning, since a retry can give a `bg_` id a new session.

use std::collections::HashMap;

use super::ChildLink;
use crate::opencode::{omo_launch, LaunchStyle, ToolPart};

/// `bg_…` → `ses_…` links, as far as one reader (a stream, a history, a conversation, the
/// oracle's watcher) has seen launches.
#[derive(Debug, Default, Clone)]
pub struct Links {
    sessions: HashMap<String, String>,
}

impl Links {
    /// Learns from a tool part: `metadata.backgroundTaskId` with `metadata.sessionId`, or an
    /// oh-my-opencode launch in its output (`<task_metadata>`, `Task ID:`/`Session ID:`).
    pub fn learn_part(&mut self, part: &ToolPart) {
        let launch = part.background_launch();
        let from_output = launch.as_ref().and_then(|l| match &l.style {
            LaunchStyle::OhMyOpencode { task_id } => task_id.clone(),
            LaunchStyle::Native => None,
        });
        let bg = from_output.or_else(|| part.background_task_id().map(str::to_owned));
        let session = launch
            .map(|l| l.child)
            .or_else(|| part.child_session_id().map(str::to_owned));
        if let (Some(bg), Some(session)) = (bg, session) {
            self.sessions.insert(bg, session);
        }
    }

    /// Learns from a tool result text alone (what the model reads).
    pub fn learn_result(&mut self, output: &str) {
        if let Some(launch) = omo_launch(output) {
            if let Some(bg) = launch.background_task_id {
                self.sessions.insert(bg, launch.session_id);
            }
        }
    }

    /// The session `bg` was launched as, if a launch was seen.
    pub fn session(&self, bg: &str) -> Option<&str> {
        self.sessions.get(bg).map(String::as_str)
    }

    /// Session ids of a claim's children, in order, without repeats. A `bg_…` id resolves
    /// through these links, else through `fallback` (the launches the oracle's watcher saw); one
    /// that resolves nowhere is left out, and the caller decides what an unlinked claim means.
    pub fn resolve(
        &self,
        children: &[ChildLink],
        fallback: impl Fn(&str) -> Option<String>,
    ) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for child in children {
            let id = match child {
                ChildLink::Session(id) => Some(id.clone()),
                ChildLink::Background(bg) => {
                    self.session(bg).map(str::to_owned).or_else(|| fallback(bg))
                }
            };
            if let Some(id) = id.filter(|id| !out.contains(id)) {
                out.push(id);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHILD: &str = "ses_df4c7ab9bffecks0CL3iL16K45";

    #[test]
    fn launches_map_background_ids_to_sessions() {
        let mut links = Links::default();
        links.learn_result(&format!("Background task launched.\n\nBackground Task ID: bg_04817ab3\nStatus: pending\n\n<task_metadata>\nsession_id: {CHILD}\nbackground_task_id: bg_04817ab3\nsubagent: Sisyphus-Junior\n</task_metadata>"));
        links.learn_result(&format!("Background agent task launched successfully.\n\nTask ID: bg_aaaabbbb\nSession ID: {CHILD}\nStatus: pending"));
        assert_eq!(links.session("bg_04817ab3"), Some(CHILD));
        assert_eq!(links.session("bg_aaaabbbb"), Some(CHILD));
        let part = ToolPart::from_part(&serde_json::json!({"type": "tool", "tool": "task",
            "state": {"status": "running", "metadata": {"backgroundTaskId": "bg_12345678",
            "sessionId": "ses_other"}}}))
        .unwrap();
        links.learn_part(&part);
        assert_eq!(links.session("bg_12345678"), Some("ses_other"));
    }

    #[test]
    fn own_links_first_then_the_fallback_then_nothing() {
        let mut links = Links::default();
        links.learn_result(&format!(
            "Background agent task launched\nTask ID: bg_own\nSession ID: {CHILD}"
        ));
        let children = [
            ChildLink::Background("bg_own".into()),
            ChildLink::Background("bg_watched".into()),
            ChildLink::Background("bg_unknown".into()),
            ChildLink::Session(CHILD.into()),
        ];
        let watched = |bg: &str| (bg == "bg_watched").then(|| "ses_watched".to_owned());
        assert_eq!(
            links.resolve(&children, watched),
            vec![CHILD.to_owned(), "ses_watched".to_owned()]
        );
    }
}
