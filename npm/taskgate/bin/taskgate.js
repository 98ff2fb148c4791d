#!/usr/bin/env node
// The `taskgate` command of the npm package: finds the platform package npm installed next to
// this one (an optionalDependency chosen by its `os`, `cpu` and `libc` fields) and runs its
// binary with the same arguments, stdin/stdout/stderr inherited, its exit code passed back and
// the signals a supervisor sends passed on. No install script: works with --ignore-scripts.
"use strict";

const { spawn } = require("child_process");
const fs = require("fs");
const path = require("path");

const SCOPE = "@taskgate";

/** "glibc" or "musl" on Linux, undefined elsewhere (the way detect-libc decides). */
function libc() {
  if (process.platform !== "linux") return undefined;
  try {
    // Network details make the report slow on some hosts and are not needed here.
    process.report.excludeNetwork = true;
    const header = process.report.getReport().header;
    return header.glibcVersionRuntime ? "glibc" : "musl";
  } catch {
    return fs.existsSync("/etc/alpine-release") ? "musl" : "glibc";
  }
}

/** This machine's platform name, as the platform packages are named. */
function platformName() {
  const os = process.platform;
  const cpu = process.arch;
  if (os === "linux") return `linux-${cpu}-${libc() === "musl" ? "musl" : "gnu"}`;
  return `${os}-${cpu}`;
}

/** Platform packages to try, best first: a static musl binary also runs on glibc Linux. */
function candidates(name) {
  return name.endsWith("-gnu") ? [name, name.replace(/-gnu$/, "-musl")] : [name];
}

function findBinary(name) {
  for (const candidate of candidates(name)) {
    let manifest;
    try {
      manifest = require.resolve(`${SCOPE}/${candidate}/package.json`);
    } catch {
      continue;
    }
    const binary = path.join(path.dirname(manifest), "bin", "taskgate");
    if (fs.existsSync(binary)) return binary;
  }
  return undefined;
}

const platform = platformName();
const binary = findBinary(platform);
if (!binary) {
  const version = require("../package.json").version;
  const known = Object.keys(require("../package.json").optionalDependencies || {});
  const supported = known.includes(`${SCOPE}/${platform}`);
  process.stderr.write(
    `taskgate: no prebuilt binary for this platform (${platform}: ` +
      `${process.platform} ${process.arch}${libc() ? " " + libc() : ""}).\n` +
      (supported
        ? `The package ${SCOPE}/${platform}@${version} should have been installed with taskgate ` +
          `as an optional dependency; it is missing (installed with --no-optional or ` +
          `--omit=optional, or from a lock file made on another platform?). Reinstall taskgate, ` +
          `or install ${SCOPE}/${platform}@${version} next to it.\n`
        : `taskgate ${version} is built for: ${known.map((k) => k.slice(SCOPE.length + 1)).join(", ")}.\n`) +
      `Or build it from source with Rust: cargo install taskgate.\n`,
  );
  process.exit(1);
}

// A supervisor's signal to this launcher is passed on to taskgate, once. SIGINT and SIGQUIT typed
// at a terminal already reach taskgate (the terminal signals the whole foreground process
// group), so with a terminal on stdin they are not passed on a second time: taskgate treats a
// second signal as "exit at once".
//
// The handlers are installed before taskgate starts: a signal that came after the start but
// before them would end this launcher by its default action and leave taskgate running with
// nobody to stop it. A handler runs from the event loop, after this script has set `child`.
const forwarded = ["SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2"];
const fromTerminal = ["SIGINT", "SIGQUIT"];
const handlers = new Map();
let child;
for (const signal of [...forwarded, ...fromTerminal]) {
  const handler = () => {
    if (fromTerminal.includes(signal) && process.stdin.isTTY) return;
    try {
      child.kill(signal);
    } catch {
      // The child has already gone; its exit is handled below.
    }
  };
  handlers.set(signal, handler);
  process.on(signal, handler);
}

child = spawn(binary, process.argv.slice(2), { stdio: "inherit" });

child.on("error", (error) => {
  process.stderr.write(`taskgate: cannot run ${binary}: ${error.message}\n`);
  process.exit(error.code === "ENOENT" ? 127 : 126);
});

child.on("exit", (code, signal) => {
  if (signal) {
    // Die of the same signal, so whoever started us sees what killed taskgate.
    for (const [name, handler] of handlers) process.removeListener(name, handler);
    process.kill(process.pid, signal);
    // Signals this process cannot die of (or ignores) end it the way a shell reports them.
    const number = require("os").constants.signals[signal] || 0;
    process.exit(128 + number);
  }
  process.exit(code === null ? 1 : code);
});
