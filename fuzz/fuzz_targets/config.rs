//! Any text as a config file: an error naming the file (never a panic).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let path = std::path::Path::new("/nonexistent/sendbox.toml");
    if let Err(e) = sendbox::config::parse(path, text) {
        assert!(!e.errors.is_empty());
        for line in &e.errors {
            assert!(line.starts_with("/nonexistent/sendbox.toml"), "{line}");
        }
    }
});
