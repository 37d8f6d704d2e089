//! The `sendbox` binary: all the work is in the library; this only reports
//! the error and picks the exit code.

fn main() -> std::process::ExitCode {
    sendbox::main()
}
