//! Profiles come from users: no input, however broken, may panic the parser.

use keelson_core::profile;
use proptest::prelude::*;

const EXAMPLE: &str = include_str!("../../../examples/orders/app.yaml");

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text(text in "\\PC{0,400}") {
        let _ = profile::parse(&text);
    }

    #[test]
    fn yaml_like_soup(parts in proptest::collection::vec(
        prop_oneof![
            Just("spec:\n"), Just("  "), Just("- "), Just(": "), Just("{"), Just("}"), Just("["), Just("]"),
            Just(","), Just("\n"), Just("&a "), Just("*a "), Just("!!str "), Just("\""), Just("'"), Just("|\n"),
            Just("environments"), Just("replicas: 3"), Just("heap: 1Gi"), Just("~"), Just("0x1F"), Just("1e999"),
            Just("metadata:\n  name: x\n"), Just("apiVersion: keelson.dev/v1alpha1\n"), Just("kind: App\n"),
        ],
        0..60,
    )) {
        let _ = profile::parse(&parts.concat());
    }

    /// Cuts, duplicates and byte flips of a real profile reach deep into the
    /// schema walk and the semantic rules.
    #[test]
    fn mutated_example(cut in 0..EXAMPLE.len(), len in 0..200usize, at in 0..EXAMPLE.len(), byte in 0u8..128) {
        let mut bytes = EXAMPLE.as_bytes().to_vec();
        let end = (cut + len).min(bytes.len());
        let removed: Vec<u8> = bytes.drain(cut..end).collect();
        let at = at.min(bytes.len());
        bytes.insert(at, byte);
        bytes.splice(at..at, removed);
        let text = String::from_utf8_lossy(&bytes);
        if let Err(e) = profile::parse(&text) {
            prop_assert!(!e.errors.is_empty());
        }
    }
}
