//! The demo (`cargo xtask demo`) runs non-interactively and tells its story.
//! The default scene: a server dies and comes back, one is drained, the
//! config is reloaded, and no request fails outside the instants the story
//! itself causes. The `--ha` scene: a group of three nodes takes a reload,
//! a drain and a node's crash without one failed request or broken
//! keep-alive connection.

use std::process::Command;

/// Runs `xdplb-demo --non-interactive ARGS`: its output and its SUMMARY line.
fn demo(args: &[&str]) -> (String, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_xdplb-demo"))
        .arg("--non-interactive")
        .args(args)
        .env("XDPLB_BIN_DIR", tests::topology::bin_dir())
        .output()
        .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = stdout
        .lines()
        .find_map(|l| l.strip_prefix("SUMMARY "))
        .map(|j| serde_json::from_str(j).unwrap())
        .unwrap_or_else(|| panic!("no SUMMARY line in:\n{stdout}"));
    (stdout, summary)
}

#[test]
fn the_demo_runs_its_story_without_unexpected_failures() {
    let (stdout, summary) = demo(&[]);
    assert_eq!(summary["unexpected_failures"], 0, "{stdout}");
    assert_eq!(summary["reload_failures"], 0, "{stdout}");
    assert_eq!(summary["drain_new_connections_to_b3"], 0, "{stdout}");
    assert_eq!(summary["drain_long_connection_ok"], 8, "{stdout}");
    assert!(summary["requests"].as_u64().unwrap() > 1000, "{stdout}");
    for b in ["b1", "b2", "b3"] {
        assert!(summary["per_server"][b].as_u64().unwrap() > 100, "{b} served too little: {stdout}");
    }
    for sentence in
        ["Killing web server b2", "took b2 out of the table", "b2 passed its checks", "Draining b3", "Reload applied"]
    {
        assert!(stdout.contains(sentence), "the story misses `{sentence}`:\n{stdout}");
    }
}

#[test]
fn the_ha_demo_loses_no_request_and_no_connection() {
    let (stdout, summary) = demo(&["--ha"]);
    assert_eq!(summary["scene"], "ha", "{stdout}");
    for n in 1..=5 {
        assert!(stdout.contains(&format!("Step {n} of 5: ")), "the story misses step {n}:\n{stdout}");
    }
    assert_eq!(summary["steps"], 5, "{stdout}");
    assert_eq!(summary["unseen"], serde_json::json!([]), "effects not seen:\n{stdout}");
    assert_eq!(summary["failed"], 0, "{stdout}");
    assert_eq!(summary["keepalive_broken"], 0, "{stdout}");
    assert_eq!(summary["keepalive_connections"], 30, "{stdout}");
    assert!(summary["new_connection_requests"].as_u64().unwrap() > 500, "{stdout}");
    // The story has teeth: after the reload some connections deviate from
    // Maglev's choice, and the kill moves some of them to a node that knows
    // them only by flow sync.
    assert!(summary["moved_deviating"].as_u64().unwrap() > 0, "{stdout}");
    for what in ["drain", "undrain", "kill"] {
        assert!(summary["convergence_ms"][what].is_u64(), "no {what} convergence time:\n{stdout}");
    }
}
