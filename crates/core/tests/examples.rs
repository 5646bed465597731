//! The example profiles in `examples/` are valid, and each profile in
//! `examples/invalid/` fails with exactly the field paths its header names.

use std::fs;
use std::path::{Path, PathBuf};

use keelson_core::profile;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

#[test]
fn valid_examples_parse() {
    for app in ["orders", "hello"] {
        let path = examples().join(app).join("app.yaml");
        let text = fs::read_to_string(&path).unwrap();
        if let Err(e) = profile::parse(&text) {
            panic!("{}: {e}", path.display());
        }
    }
}

/// Each invalid example starts with `# expect: PATH` lines, one per error.
#[test]
fn invalid_examples_report_exactly_their_paths() {
    let dir = examples().join("invalid");
    let mut checked = 0;
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
    {
        let text = fs::read_to_string(path).unwrap();
        let mut expected: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .map(|l| l.trim().to_string())
            .collect();
        assert!(
            !expected.is_empty(),
            "{} has no `# expect:` line",
            path.display()
        );
        let errors = match profile::parse(&text) {
            Ok(_) => panic!("{} parsed, but it must fail", path.display()),
            Err(e) => e.errors,
        };
        let mut got: Vec<String> = errors.iter().map(|e| e.path.clone()).collect();
        expected.sort();
        got.sort();
        assert_eq!(
            got,
            expected,
            "{}:\n{}",
            path.display(),
            profile::ValidationErrors {
                errors: errors.clone()
            }
        );
        for e in &errors {
            assert!(
                e.line > 0 && e.column > 0,
                "{}: {e} has no position",
                path.display()
            );
        }
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} invalid examples");
}
