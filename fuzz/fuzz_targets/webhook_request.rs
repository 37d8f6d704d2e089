//! Any request (method, path, headers, body) against routes with every
//! authentication scheme: an answer from the documented set, never a panic
//! and never a 5xx but the documented 503.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|raw: &[u8]| {
    let status = sendbox_triggers::webhook::fuzzing::request(raw);
    assert!(
        matches!(status, 0 | 200 | 202 | 401 | 404 | 408 | 409 | 413 | 503),
        "undocumented status {status}"
    );
});
