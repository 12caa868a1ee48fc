//! The `guard` binary as a shell or a log collector meets it: completion scripts, the manual
//! page, and a fatal error under `--log-format json`. Needs no root.

use std::process::{Command, Output};

fn guard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_guard"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run guard")
}

fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn completions_cover_every_subcommand() {
    let bash = stdout(&guard(&["completions", "bash"]));
    assert!(bash.contains("complete -F _guard"), "{bash}");
    for sub in ["run", "status", "explain", "drops", "unload", "check-config", "version"] {
        assert!(bash.contains(sub), "bash completion lacks {sub}");
    }
    for shell in ["zsh", "fish"] {
        assert!(!stdout(&guard(&["completions", shell])).is_empty(), "{shell}");
    }
}

#[test]
fn the_manual_page_is_roff_for_section_1() {
    let man = stdout(&guard(&["man"]));
    assert!(man.contains(".TH guard 1"), "{man}");
    assert!(man.contains("Stops Docker from exposing container ports"), "{man}");
    assert!(man.contains("run") && man.contains("status"), "{man}");
}

#[test]
fn a_fatal_error_under_json_logs_is_one_json_line() {
    let out = guard(&["--log-format", "json", "run", "--iface", "no-such-if0"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr.lines().last().unwrap_or_default();
    let parsed: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {stderr}"));
    assert_eq!(parsed["level"], "ERROR", "{line}");
    assert_eq!(parsed["fields"]["fatal"], true, "{line}");
    let message = parsed["fields"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("no interface named no-such-if0"), "{line}");
}
