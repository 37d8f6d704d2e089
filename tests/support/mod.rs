//! Helpers only the end-to-end tests of the binary use; what other crates'
//! tests share is in `crates/sendbox-test-support`.

pub mod daemon;
