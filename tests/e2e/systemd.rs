//! The shipped systemd units pass `systemd-analyze verify` and rate ≤ 2.0 on
//! `systemd-analyze security` (skipped where systemd-analyze is not installed).

use std::path::Path;
use std::process::Command;

fn analyze_available() -> bool {
    Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Copies a unit into `dir` as instance `staging`, pointing ExecStart at the built binary.
fn instance(dir: &Path, unit: &str) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("systemd")
        .join(unit);
    let text = std::fs::read_to_string(&src).expect("unit file");
    let text = text.replace("/usr/local/bin/confab", env!("CARGO_BIN_EXE_confab"));
    let dst = dir.join(unit.replace("@.", "@staging."));
    std::fs::write(&dst, text).expect("write unit");
    dst
}

fn exposure(unit: &Path) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(unit)
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no rating in:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    line.split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unparsable: {line}"))
}

#[test]
fn units_verify_and_are_hardened() {
    if !analyze_available() {
        eprintln!("systemd-analyze not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for unit in [
        "confab@.service",
        "confab-backup@.service",
        "confab-backup@.timer",
    ] {
        let path = instance(dir.path(), unit);
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .current_dir(dir.path())
            .output()
            .expect("systemd-analyze verify");
        let err = String::from_utf8_lossy(&out.stderr);
        // verify also loads the units named in After= (not installed here) and may not find
        // the binary's dependencies; only our unit's own findings count.
        let ours: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("confab"))
            .filter(|l| !l.contains("not found"))
            .collect();
        assert!(ours.is_empty(), "{unit}: {err}");
        if unit.ends_with(".service") {
            let score = exposure(&path);
            assert!(score <= 2.0, "{unit}: exposure {score}");
        }
    }
}
