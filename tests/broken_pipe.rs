//! A closed stdout ends the binary quietly: no panic message, and either success or the
//! conventional death by SIGPIPE (`rln-engine infer --help | head -1`).

use std::process::{Command, Stdio};

/// Runs the binary with stdout a pipe whose read end is already closed (every write
/// fails with EPIPE, as after `| head -1` has exited); returns (status, stderr).
fn run_into_closed_pipe(args: &[&str], cwd: &std::path::Path) -> (std::process::ExitStatus, String) {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_rln-engine"))
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("the binary runs");
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn assert_quiet(args: &[&str], cwd: &std::path::Path) {
    let (status, stderr) = run_into_closed_pipe(args, cwd);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "rln-engine {args:?} into a closed pipe printed: {stderr}"
    );
    #[cfg(unix)]
    let by_sigpipe = {
        use std::os::unix::process::ExitStatusExt;
        status.signal() == Some(13)
    };
    #[cfg(not(unix))]
    let by_sigpipe = false;
    assert!(
        status.success() || by_sigpipe,
        "rln-engine {args:?} into a closed pipe ended with {status} (want success or SIGPIPE); stderr: {stderr}"
    );
}

#[test]
fn help_into_a_closed_pipe_is_quiet() {
    let dir = tempfile::tempdir().unwrap();
    assert_quiet(&["--help"], dir.path());
    assert_quiet(&["infer", "--help"], dir.path());
}

#[test]
fn println_of_a_command_into_a_closed_pipe_is_quiet() {
    // `psf` prints one line (println!) after writing its file
    let dir = tempfile::tempdir().unwrap();
    assert_quiet(
        &[
            "psf", "-o", "psf.tif", "--nx", "15", "--nz", "9", "--dxy", "0.1", "--dz", "0.2",
        ],
        dir.path(),
    );
    assert!(
        dir.path().join("psf.tif").is_file(),
        "the file is written before the print"
    );
}
