//! The demo (`cargo xtask demo`) runs non-interactively and tells its story:
//! a server dies and comes back, one is drained, the config is reloaded, and
//! no request fails outside the instants the story itself causes.

use std::process::Command;

#[test]
fn the_demo_runs_its_story_without_unexpected_failures() {
    let out = Command::new(env!("CARGO_BIN_EXE_xdplb-demo"))
        .arg("--non-interactive")
        .env("XDPLB_BIN_DIR", tests::topology::bin_dir())
        .output()
        .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = stdout
        .lines()
        .find_map(|l| l.strip_prefix("SUMMARY "))
        .map(|j| serde_json::from_str(j).unwrap())
        .unwrap_or_else(|| panic!("no SUMMARY line in:\n{stdout}"));
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
