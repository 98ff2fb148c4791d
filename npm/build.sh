#!/usr/bin/env bash
# Packs the npm packages of taskgate: the main package `taskgate` (the launcher) and one platform
# package `@taskgate/<platform>` holding the binary, both at the version in Cargo.toml.
#
#   npm/build.sh                                  # release build for this machine, packed into npm/dist
#   npm/build.sh --target aarch64-unknown-linux-musl   # cross build (the toolchain must be set up)
#   npm/build.sh --binary target/debug/taskgate --out /tmp/x   # pack a binary built elsewhere
#
# Options:
#   --binary PATH     pack this binary instead of running `cargo build --release`
#   --target TRIPLE   cargo's target triple; also chooses the platform package
#   --platform NAME   the platform package (a folder in npm/platforms), default: from the target
#                     or this machine
#   --out DIR         where the .tgz files go (default npm/dist); prints their paths, one a line
# Needs node and npm (and cargo unless --binary).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
binary="" target="" platform="" out="$here/dist"
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --target) target="$2"; shift 2 ;;
    --platform) platform="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

# The platform package for a Rust target triple.
platform_of_target() {
  case "$1" in
    x86_64-unknown-linux-gnu) echo linux-x64-gnu ;;
    aarch64-unknown-linux-gnu) echo linux-arm64-gnu ;;
    x86_64-unknown-linux-musl) echo linux-x64-musl ;;
    aarch64-unknown-linux-musl) echo linux-arm64-musl ;;
    x86_64-apple-darwin) echo darwin-x64 ;;
    aarch64-apple-darwin) echo darwin-arm64 ;;
    *) echo "build.sh: no npm platform package for target $1" >&2; return 1 ;;
  esac
}

if [ -z "$platform" ]; then
  if [ -n "$target" ]; then
    platform="$(platform_of_target "$target")"
  else
    platform="$(node -p '
      const libc = process.platform === "linux"
        ? (process.report.getReport().header.glibcVersionRuntime ? "-gnu" : "-musl") : "";
      `${process.platform}-${process.arch}${libc}`')"
  fi
fi
[ -f "$here/platforms/$platform/package.json" ] || {
  echo "build.sh: no platform package npm/platforms/$platform" >&2; exit 2; }

# The version of the crate: the first `version = "…"` of Cargo.toml's [package] table.
version="$(awk -F'"' '/^\[/{p=($0=="[package]")} p&&/^version *=/{print $2; exit}' "$root/Cargo.toml")"
[ -n "$version" ] || { echo "build.sh: no version in Cargo.toml" >&2; exit 1; }

if [ -z "$binary" ]; then
  cargo_target_dir="${CARGO_TARGET_DIR:-$root/target}"
  if [ -n "$target" ]; then
    (cd "$root" && cargo build --release --locked --target "$target") >&2
    binary="$cargo_target_dir/$target/release/taskgate"
  else
    (cd "$root" && cargo build --release --locked) >&2
    binary="$cargo_target_dir/release/taskgate"
  fi
fi
[ -x "$binary" ] || { echo "build.sh: $binary is not an executable" >&2; exit 1; }

mkdir -p "$out"
out="$(cd "$out" && pwd)"
stage="$(mktemp -d "$out/.stage.XXXXXX")"
trap 'rm -rf "$stage"' EXIT

# The platform package: its manifest with the version, the binary, the licence.
mkdir -p "$stage/platform/bin"
cp "$here/platforms/$platform/package.json" "$stage/platform/"
cp "$binary" "$stage/platform/bin/taskgate"
chmod 755 "$stage/platform/bin/taskgate"
cp "$root/LICENSE" "$stage/platform/"

# The main package: the launcher, and every platform package as an optional dependency.
mkdir -p "$stage/main/bin"
cp "$here/taskgate/package.json" "$here/taskgate/README.md" "$stage/main/"
cp "$here/taskgate/bin/taskgate.js" "$stage/main/bin/"
chmod 755 "$stage/main/bin/taskgate.js"
cp "$root/LICENSE" "$stage/main/"

node - "$stage" "$version" "$here/platforms" <<'JS'
const fs = require("fs");
const path = require("path");
const [stage, version, platforms] = process.argv.slice(2);
const stamp = (file, edit) => {
  const manifest = JSON.parse(fs.readFileSync(file, "utf8"));
  manifest.version = version;
  edit(manifest);
  fs.writeFileSync(file, JSON.stringify(manifest, null, 2) + "\n");
};
stamp(path.join(stage, "platform/package.json"), () => {});
stamp(path.join(stage, "main/package.json"), (manifest) => {
  manifest.optionalDependencies = {};
  for (const dir of fs.readdirSync(platforms).sort()) {
    const name = JSON.parse(fs.readFileSync(path.join(platforms, dir, "package.json"), "utf8")).name;
    manifest.optionalDependencies[name] = version;
  }
});
JS

for package in platform main; do
  (cd "$stage/$package" && npm pack --json --pack-destination "$out" 2>/dev/null) |
    node -e 'let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () =>
      console.log(require("path").join(process.argv[1], JSON.parse(s)[0].filename)))' "$out"
done
