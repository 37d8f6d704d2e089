//! Any email, unvalidated, straight into message building: refused with a
//! reason, or a valid RFC 5322 message with no Bcc header. Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sendbox_fuzz::FuzzEmail;

fuzz_target!(|e: FuzzEmail| {
    sendbox_fuzz::build_and_check(&e.into());
});
