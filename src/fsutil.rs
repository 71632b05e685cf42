//! The safety of the user's files: writing so that a failure never leaves a half-written
//! file under the final name (temporary `.NAME.partial-PID`, then rename), removing the
//! partial files of killed runs, refusing an output that is one of the inputs (by file
//! identity, whatever path names it), locking an output against a second writer, and
//! checking output paths before the work starts.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

/// Drops a `file.h5:/dataset` suffix: the file is what can be overwritten.
fn file_part(path: &Path) -> PathBuf {
    let s = path.to_string_lossy();
    let lower = s.to_lowercase();
    for ext in [".h5:", ".hdf5:"] {
        if let Some(i) = lower.rfind(ext) {
            return PathBuf::from(&s[..i + ext.len() - 1]);
        }
    }
    path.to_path_buf()
}

/// `a/./b/../c` → `a/c` without touching the file system (for paths whose folder is missing).
fn lexical_normal(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// What identifies a file: its canonical path (links resolved; for a file that does not
/// exist yet, its canonical folder joined with its name) and, when it exists, its
/// (device, inode), which also catches hard links.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileIdentity {
    canonical: PathBuf,
    inode: Option<(u64, u64)>,
}

fn identity(path: &Path) -> FileIdentity {
    let path = file_part(path);
    #[cfg(unix)]
    let inode = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&path).ok().map(|m| (m.dev(), m.ino()))
    };
    #[cfg(not(unix))]
    let inode = None;
    let canonical = std::fs::canonicalize(&path).unwrap_or_else(|_| {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path.file_name().map(PathBuf::from).unwrap_or_default();
        match std::fs::canonicalize(&parent) {
            Ok(p) => p.join(name),
            Err(_) => lexical_normal(&std::env::current_dir().unwrap_or_default().join(&path)),
        }
    });
    FileIdentity { canonical, inode }
}

/// True when `a` and `b` name the same file (same device and inode, or the same
/// canonical path), however they are spelled (`./x/../f`, symbolic or hard links).
pub fn same_file(a: &Path, b: &Path) -> bool {
    let (ia, ib) = (identity(a), identity(b));
    match (ia.inode, ib.inode) {
        (Some(x), Some(y)) => x == y,
        _ => ia.canonical == ib.canonical,
    }
}

/// Refuses, before any work, an output that is one of the inputs or another output.
/// `outputs` and `inputs` are (role, path) pairs; the role names the option in the
/// message, e.g. ("the output -o", "out.tif"), ("the input volume", "in.tif").
pub fn refuse_overwriting_inputs(outputs: &[(&str, &Path)], inputs: &[(&str, &Path)]) -> Result<()> {
    for (i, (out_role, out)) in outputs.iter().enumerate() {
        for (in_role, input) in inputs {
            if same_file(out, input) {
                return Err(Error::invalid(format!(
                    "{out_role} {} is {in_role} {} (the same file): writing it would destroy the input; \
                     choose another output name",
                    out.display(),
                    input.display()
                )));
            }
        }
        for (other_role, other) in &outputs[i + 1..] {
            if same_file(out, other) {
                return Err(Error::invalid(format!(
                    "{out_role} {} and {other_role} {} are the same file: one would overwrite the other; \
                     give them different names",
                    out.display(),
                    other.display()
                )));
            }
        }
    }
    Ok(())
}

/// Files to delete if the process is interrupted (SIGINT/SIGTERM): the partial files
/// being written and the output locks held.
static CLEANUP_ON_SIGNAL: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn register_cleanup(path: &Path) {
    if let Ok(mut v) = CLEANUP_ON_SIGNAL.lock() {
        v.push(path.to_path_buf());
    }
}

fn unregister_cleanup(path: &Path) {
    if let Ok(mut v) = CLEANUP_ON_SIGNAL.lock() {
        if let Some(i) = v.iter().rposition(|p| p == path) {
            v.swap_remove(i);
        }
    }
}

/// Deletes the partial files and locks of this process; called by the signal handler.
pub fn remove_files_of_interrupted_run() {
    if let Ok(v) = CLEANUP_ON_SIGNAL.lock() {
        for p in v.iter() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Installs a SIGINT/SIGTERM handler that removes this process's partial files and
/// output locks, then exits with status 130. Call once, early in `main`.
pub fn install_interrupt_cleanup() {
    let _ = ctrlc::set_handler(|| {
        remove_files_of_interrupted_run();
        eprintln!("interrupted: partial output files removed; nothing was written under the final names");
        std::process::exit(130);
    });
}

/// True while process `pid` exists (Linux: /proc/PID). Where this cannot be told, true,
/// so that nothing that might belong to a live process is removed.
fn process_alive(pid: u32) -> bool {
    let proc_root = Path::new("/proc");
    if !proc_root.join("self").exists() {
        return true;
    }
    proc_root.join(pid.to_string()).exists()
}

/// Removes `.NAME.partial-PID` files next to `path` left by processes that no longer
/// run (a killed `infer`, `rl`, ...); returns how many were removed.
pub fn remove_stale_partials(path: &Path) -> usize {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return 0;
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let prefix = format!(".{name}.partial-");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let fname = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = fname.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) && std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// An advisory lock on an output, held while a command writes it: a second process
/// writing the same output (or training into the same `-o`) fails at once with a clear
/// message instead of interleaving its files with ours. The lock file `.NAME.lock` sits
/// next to the output and is removed when the lock is dropped.
#[derive(Debug)]
pub struct OutputLock {
    lock_path: PathBuf,
    _file: std::fs::File,
}

impl OutputLock {
    pub fn acquire(output: &Path) -> Result<OutputLock> {
        let output = file_part(output);
        let name = output
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| Error::invalid(format!("{}: not a file name", output.display())))?;
        let lock_path = match output.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.join(format!(".{name}.lock")),
            _ => PathBuf::from(format!(".{name}.lock")),
        };
        // a lock file removed by its previous holder between our open and our lock is
        // no lock: retry until the locked file is the one under the name
        for _ in 0..20 {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(|e| Error::io(&lock_path, e))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(Error::invalid(format!(
                    "another process is writing {} (it holds {}): wait for it to finish or choose another output name",
                    output.display(),
                    lock_path.display()
                )))
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&lock_path, e)),
            }
            #[cfg(unix)]
            {
                use std::os::unix::fs::MetadataExt;
                let held = file.metadata().map(|m| (m.dev(), m.ino())).ok();
                let named = std::fs::metadata(&lock_path).map(|m| (m.dev(), m.ino())).ok();
                if held.is_none() || held != named {
                    continue;
                }
            }
            register_cleanup(&lock_path);
            return Ok(OutputLock { lock_path, _file: file });
        }
        Err(Error::invalid(format!(
            "could not lock {}: its lock file keeps changing; is another process writing it?",
            output.display()
        )))
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // removed while still locked, so no one locks the old file after us
        let _ = std::fs::remove_file(&self.lock_path);
        unregister_cleanup(&self.lock_path);
    }
}

/// Checks an output file path before the work: not a folder, its folder exists, a known
/// extension (when `extensions` is not empty; compared case-insensitively, without the
/// dot) and a folder we may write into. `role` names the option in messages ("-o").
pub fn check_output_file(path: &Path, role: &str, extensions: &[&str]) -> Result<()> {
    let file = file_part(path);
    // an OME-Zarr store is a folder; whether an existing one may be written is the
    // writer's decision (resume, block mode)
    let store = file.extension().is_some_and(|e| e.eq_ignore_ascii_case("zarr"));
    if file.is_dir() && !store {
        return Err(Error::invalid(format!(
            "{role} {} is a folder: give a file name",
            file.display()
        )));
    }
    check_output_dir(&file)?;
    if !extensions.is_empty() {
        let ext = file
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if !extensions.contains(&ext.as_str()) {
            return Err(Error::invalid(format!(
                "{role} {}: unknown extension {:?}; use one of: {}",
                file.display(),
                ext,
                extensions
                    .iter()
                    .map(|e| format!(".{e}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    // can we create files there? (a probe, removed at once)
    let probe = {
        let p = temp_path_for(&file);
        p.with_file_name(format!(
            "{}.probe",
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ))
    };
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::invalid(format!(
            "{role} {}: cannot write into its folder ({e}); choose a writable location",
            file.display()
        ))),
    }
}

/// The temporary name a file is written under before it is renamed into place:
/// `.NAME.partial-PID` in the same folder, so the rename stays on one file system.
pub fn temp_path_for(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = format!(".{name}.partial-{}", std::process::id());
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join(tmp),
        _ => PathBuf::from(tmp),
    }
}

/// Checks that the folder `path` would be written into exists, before any work starts
/// (of `file.h5:/dataset`, the file's folder: the dataset path is inside the file).
pub fn check_output_dir(path: &Path) -> Result<()> {
    match file_part(path).parent() {
        Some(p) if !p.as_os_str().is_empty() && !p.is_dir() => Err(Error::invalid(format!(
            "output folder {} does not exist: create it first or choose another -o path",
            p.display()
        ))),
        _ => Ok(()),
    }
}

/// Writes through `fill` into a temporary file, syncs it and renames it to `path`.
/// On any error the temporary file is removed and `path` is untouched.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>,
) -> Result<()> {
    check_output_dir(path)?;
    remove_stale_partials(path);
    let tmp = temp_path_for(path);
    register_cleanup(&tmp);
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        fill(&mut w)?;
        w.flush().map_err(|e| Error::io(&tmp, e))?;
        let file = w.into_inner().map_err(|e| Error::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    unregister_cleanup(&tmp);
    result
}

/// Writes `bytes` to `path` atomically (temporary name, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes).map_err(|e| Error::io(path, e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_dir_of_an_hdf5_dataset_is_the_files_folder() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("out.h5:/group/restored");
        check_output_dir(&ok).unwrap();
        check_output_dir(&dir.path().join("out.hdf5:/restored")).unwrap();
        let missing = dir.path().join("no-such-folder").join("out.h5:/restored");
        let e = check_output_dir(&missing).unwrap_err().to_string();
        assert!(e.contains("no-such-folder does not exist"), "{e}");
    }

    #[test]
    fn failed_write_leaves_nothing_under_either_name() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.bin");
        let r = write_atomic_with(&out, |w| {
            w.write_all(b"half").unwrap();
            Err(Error::invalid("simulated failure"))
        });
        assert!(r.is_err());
        assert!(!out.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "temporary file left behind"
        );
        write_atomic(&out, b"whole").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"whole");
    }

    #[test]
    fn failed_overwrite_keeps_the_old_file_byte_identical() {
        // a writer that wrote straight to the final name and deleted it on error would
        // pass the test above but lose the old file here
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model.safetensors");
        let old: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&out, &old).unwrap();
        let r = write_atomic_with(&out, |w| {
            w.write_all(&vec![0xAB; 3 << 20]).unwrap(); // past the 1 MiB buffer: on disk
            Err(Error::invalid("disk full (simulated)"))
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(&out).unwrap(), old, "the old file changed");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "partial file left");
    }

    #[test]
    fn the_same_file_is_recognized_under_every_spelling() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("x")).unwrap();
        let input = d.join("in.tif");
        std::fs::write(&input, b"data").unwrap();
        std::fs::hard_link(&input, d.join("hard.tif")).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&input, d.join("soft.tif")).unwrap();
        assert!(same_file(&input, &d.join("x/../in.tif")));
        assert!(same_file(&input, &d.join("./x/.././in.tif")));
        assert!(same_file(&input, &d.join("hard.tif")));
        #[cfg(unix)]
        assert!(same_file(&input, &d.join("soft.tif")));
        assert!(same_file(&d.join("in.h5:/data"), &d.join("x/../in.h5:/other")));
        assert!(!same_file(&input, &d.join("new.tif")));
        assert!(
            same_file(&d.join("new.tif"), &d.join("x/../new.tif")),
            "files not yet written"
        );
        assert!(!same_file(&d.join("x/in.tif"), &input));
        let err = refuse_overwriting_inputs(
            &[("the output -o", &d.join("x/../hard.tif"))],
            &[("the PSF --psf", &d.join("p.tif")), ("the input volume", &input)],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("the output -o") && err.contains("the input volume"),
            "{err}"
        );
        assert!(err.contains("choose another output name"), "{err}");
        let err = refuse_overwriting_inputs(&[("-o", &d.join("m.tif")), ("--log", &d.join("x/../m.tif"))], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--log"), "{err}");
        refuse_overwriting_inputs(&[("-o", &d.join("out.tif"))], &[("the input volume", &input)]).unwrap();
    }

    #[test]
    fn stale_partials_of_dead_processes_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.tif");
        // pid 4194304 is above Linux's pid_max; pid 1 always runs
        let dead = dir.path().join(".out.tif.partial-4194304");
        let live = dir.path().join(".out.tif.partial-1");
        let other = dir.path().join(".other.tif.partial-4194304");
        for p in [&dead, &live, &other] {
            std::fs::write(p, b"half").unwrap();
        }
        write_atomic(&out, b"whole").unwrap();
        assert!(!dead.exists(), "stale partial of a dead process kept");
        assert!(live.exists(), "partial of a running process removed");
        assert!(other.exists(), "partial of another output removed");
    }

    #[test]
    fn a_second_writer_of_one_output_is_refused_until_the_first_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model.safetensors");
        let first = OutputLock::acquire(&out).unwrap();
        let err = OutputLock::acquire(&dir.path().join("./model.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("another process is writing"), "{err}");
        drop(first);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "lock file left");
        let _again = OutputLock::acquire(&out).unwrap();
    }

    #[test]
    fn output_paths_are_checked_before_the_work() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        check_output_file(&d.join("a.tif"), "-o", &["tif", "tiff"]).unwrap();
        check_output_file(&d.join("a.h5:/data"), "-o", &["h5"]).unwrap();
        let e = check_output_file(&d.join("a.png"), "-o", &["tif", "tiff"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown extension") && e.contains(".tif"), "{e}");
        let e = check_output_file(d, "-o", &[]).unwrap_err().to_string();
        assert!(e.contains("is a folder"), "{e}");
        let e = check_output_file(&d.join("no/a.tif"), "-o", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        assert_eq!(std::fs::read_dir(d).unwrap().count(), 0, "probe file left");
    }

    #[test]
    fn missing_output_folder_is_reported() {
        let err = write_atomic(Path::new("/nonexistent-folder-rln/x.bin"), b"x").unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
