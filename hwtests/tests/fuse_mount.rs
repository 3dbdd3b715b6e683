//! `tier0 mount` on a real 3-daemon cluster on loopback, used with plain `std::fs` as any
//! program would: listings, whole and partial reads byte for byte, `cp` in (committed at
//! close, read back with `tier0 get`), mkdir/rename/unlink/rmdir, the errnos of what the
//! mount cannot do, and a clean unmount on SIGTERM. Needs root and /dev/fuse
//! (`hwtests/run fuse`, which builds `target/debug/tier0` first).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::io::IntoRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `tier0` binary: `TIER0_BIN`, else the one beside this test's `deps/` folder.
fn tier0_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("TIER0_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("tier0");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p tier0` (hwtests/run fuse does) or set TIER0_BIN",
        bin.display()
    );
    bin
}

fn tier0(env: &[(String, String)], args: &[&str]) -> Output {
    Command::new(tier0_bin())
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("TIER0_LOG", "warn")
        .output()
        .expect("run tier0")
}

fn ok(env: &[(String, String)], args: &[&str]) -> String {
    let output = tier0(env, args);
    assert!(
        output.status.success(),
        "tier0 {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A local cluster (`tier0 cluster up`), taken down on drop.
struct Cluster {
    dir: PathBuf,
    env: Vec<(String, String)>,
}

impl Cluster {
    fn up(dir: &Path) -> Cluster {
        let dir_arg = dir.to_str().unwrap();
        let up = ok(
            &[],
            &[
                "cluster",
                "up",
                "--nodes",
                "3",
                "--dir",
                dir_arg,
                "--store-size",
                "128MiB",
                "--chunk-size",
                "256KiB",
            ],
        );
        let env = up
            .lines()
            .filter_map(|line| line.strip_prefix("export "))
            .map(|line| {
                let (key, value) = line.split_once('=').unwrap();
                (key.to_owned(), value.to_owned())
            })
            .collect();
        Cluster {
            dir: dir.to_owned(),
            env,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = tier0(
            &[],
            &["cluster", "down", "--dir", self.dir.to_str().unwrap()],
        );
    }
}

fn is_mounted(path: &Path) -> bool {
    let wanted = path.to_str().unwrap().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .any(|line| line.split(' ').nth(1) == Some(wanted.as_str()))
}

/// `tier0 mount` as a child process; on drop it is stopped and the mount point is unmounted
/// whatever happened (umount, then `fusermount3 -u`, then a lazy umount2).
struct Mount {
    child: Option<Child>,
    path: PathBuf,
    log: PathBuf,
}

impl Mount {
    fn start(env: &[(String, String)], path: &Path, log: &Path) -> Mount {
        let child = Command::new(tier0_bin())
            .arg("mount")
            .arg(path)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("TIER0_LOG", "info")
            .stdout(Stdio::null())
            .stderr(File::create(log).unwrap())
            .spawn()
            .expect("start tier0 mount");
        let mut mount = Mount {
            child: Some(child),
            path: path.to_owned(),
            log: log.to_owned(),
        };
        // Generous (a cold debug binary, a loaded machine), but bounded.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if is_mounted(path) && std::fs::read_dir(path).is_ok() {
                return mount;
            }
            if let Some(status) = mount.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "tier0 mount exited ({status}) before mounting:\n{}",
                    mount.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the mount did not appear within 60 s:\n{}",
                mount.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit status (within 30 s).
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill sends a signal to the child this test started; no memory involved.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "tier0 mount did not exit within 30 s of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: as in `terminate`.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.path) {
            let _ = Command::new("umount").arg(&self.path).status();
        }
        if is_mounted(&self.path) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.path)
                .status();
        }
        if is_mounted(&self.path) {
            let path = std::ffi::CString::new(self.path.as_os_str().as_bytes()).unwrap();
            // SAFETY: a NUL-terminated path that lives across the call.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Deterministic bytes: a file's contents from its seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

fn errno(result: std::io::Result<impl Sized>) -> i32 {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(error) => error.raw_os_error().expect("an OS error"),
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
#[ignore = "needs /dev/fuse and root: run by hwtests/run fuse"]
fn the_namespace_mounts_reads_writes_renames_and_unmounts_on_sigterm() {
    // Dropped last: the mount and the cluster are gone before it is removed.
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let cluster = Cluster::up(&work.join("cluster"));
    let env = &cluster.env;

    // A tree put with `tier0 put`: files of several chunks (256 KiB), one of less, an empty one.
    let local = work.join("tree");
    std::fs::create_dir_all(local.join("sub/deeper")).unwrap();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("big", pattern(1, 1_000_037)),
        ("exact", pattern(2, 2 * 262_144)),
        ("sub/small", pattern(3, 4_321)),
        ("sub/deeper/empty", Vec::new()),
    ];
    for (name, bytes) in &files {
        std::fs::write(local.join(name), bytes).unwrap();
    }
    ok(env, &["put", local.to_str().unwrap(), "/data"]);

    let mnt = work.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut mount = Mount::start(env, &mnt, &work.join("mount.log"));
    let data = mnt.join("data");

    // Listings and attributes.
    assert_eq!(names(&mnt), ["data"]);
    assert_eq!(names(&data), ["big", "exact", "sub"]);
    assert_eq!(names(&data.join("sub")), ["deeper", "small"]);
    assert!(data.join("sub").metadata().unwrap().is_dir());
    for (name, bytes) in &files {
        let meta = data.join(name).metadata().unwrap();
        assert!(meta.is_file(), "{name}");
        assert_eq!(meta.len(), bytes.len() as u64, "{name}");
    }

    // Whole files, byte for byte.
    for (name, bytes) in &files {
        assert!(std::fs::read(data.join(name)).unwrap() == *bytes, "{name}");
    }

    // Ranges: inside a chunk, across a chunk boundary, up to and past the end.
    let big = &files[0].1;
    let mut file = File::open(data.join("big")).unwrap();
    for (offset, len) in [
        (0usize, 100usize),
        (300_000, 100_000),
        (262_000, 1_000),
        (524_287, 2),
        (1_000_000, 37),
    ] {
        file.seek(SeekFrom::Start(offset as u64)).unwrap();
        let mut got = vec![0u8; len];
        file.read_exact(&mut got).unwrap();
        assert!(got == big[offset..offset + len], "{offset}+{len}");
    }
    let mut tail = vec![0u8; 100];
    let got = file.read_at(&mut tail, 1_000_000).unwrap();
    assert_eq!(got, 37, "a read past the end is short");
    assert!(tail[..37] == big[1_000_000..]);
    assert_eq!(file.read_at(&mut tail, 2_000_000).unwrap(), 0);
    drop(file);

    // A missing path.
    assert_eq!(errno(std::fs::read(data.join("nope"))), libc::ENOENT);
    assert_eq!(errno(data.join("sub/nope").metadata()), libc::ENOENT);

    // `cp` in: committed at close, so `tier0 get` right after sees every byte.
    let source = work.join("source.bin");
    let source_bytes = pattern(4, 777_777);
    std::fs::write(&source, &source_bytes).unwrap();
    let cp = Command::new("cp")
        .arg(&source)
        .arg(data.join("copied.bin"))
        .status()
        .unwrap();
    assert!(cp.success());
    let back = work.join("back.bin");
    ok(env, &["get", "/data/copied.bin", back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap() == source_bytes);
    assert!(std::fs::read(data.join("copied.bin")).unwrap() == source_bytes);

    // A new version through the mount (a truncating open), seen by the next open.
    std::fs::write(data.join("sub/small"), b"replaced").unwrap();
    assert_eq!(std::fs::read(data.join("sub/small")).unwrap(), b"replaced");

    // A file committed by another client shows its new bytes at the next open.
    let other = work.join("other.bin");
    let other_bytes = pattern(5, 300_001);
    std::fs::write(&other, &other_bytes).unwrap();
    ok(env, &["put", other.to_str().unwrap(), "/data/exact"]);
    assert!(std::fs::read(data.join("exact")).unwrap() == other_bytes);

    // mkdir, rename of a file and of a directory, unlink, rmdir.
    std::fs::create_dir(data.join("newdir")).unwrap();
    assert_eq!(
        errno(std::fs::create_dir(data.join("newdir"))),
        libc::EEXIST
    );
    std::fs::rename(data.join("copied.bin"), data.join("newdir/moved.bin")).unwrap();
    assert_eq!(errno(data.join("copied.bin").metadata()), libc::ENOENT);
    assert!(std::fs::read(data.join("newdir/moved.bin")).unwrap() == source_bytes);
    std::fs::rename(data.join("newdir"), data.join("renamed")).unwrap();
    assert!(std::fs::read(data.join("renamed/moved.bin")).unwrap() == source_bytes);
    assert_eq!(
        errno(std::fs::remove_dir(data.join("renamed"))),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno(std::fs::remove_file(data.join("renamed"))),
        libc::EISDIR
    );
    std::fs::remove_file(data.join("renamed/moved.bin")).unwrap();
    assert_eq!(
        errno(data.join("renamed/moved.bin").metadata()),
        libc::ENOENT
    );
    std::fs::remove_dir(data.join("renamed")).unwrap();
    assert_eq!(names(&data), ["big", "exact", "sub"]);
    let ls = ok(env, &["ls", "/data"]);
    assert!(!ls.contains("renamed"), "{ls}");

    // What the mount cannot do, with its documented errno (EOPNOTSUPP): a write that is
    // not at the end of what was written, which also fails the close (EIO) and commits
    // nothing; an append to a file with bytes.
    let mut seeky = File::create(data.join("seeky.bin")).unwrap();
    seeky.write_all(&[7u8; 4096]).unwrap();
    assert_eq!(errno(seeky.write_at(b"x", 100_000)), libc::EOPNOTSUPP);
    let fd = seeky.into_raw_fd();
    // SAFETY: closes the descriptor `into_raw_fd` handed over; nothing else owns it.
    let closed = unsafe { libc::close(fd) };
    assert_eq!(closed, -1, "the close reports the failed write");
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EIO)
    );
    assert_eq!(data.join("seeky.bin").metadata().unwrap().len(), 0);
    let append = OpenOptions::new()
        .append(true)
        .open(data.join("big"))
        .unwrap()
        .write_all(b"more");
    assert_eq!(errno(append), libc::EOPNOTSUPP);
    assert!(
        std::fs::read(data.join("big")).unwrap() == *big,
        "nothing appended"
    );

    // SIGTERM: the mount goes away, the mount point is an empty directory again.
    let status = mount.terminate();
    assert!(status.success(), "{status}:\n{}", mount.log());
    assert!(!is_mounted(&mnt), "still mounted after SIGTERM");
    assert_eq!(names(&mnt), Vec::<String>::new());
    drop(mount);
    drop(cluster);
}

#[test]
#[ignore = "needs /dev/fuse and root: run by hwtests/run fuse"]
fn an_outside_umount_ends_the_mount_and_a_busy_one_is_detached_on_sigterm() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let cluster = Cluster::up(&work.join("cluster"));
    let env = &cluster.env;
    let local = work.join("one.bin");
    std::fs::write(&local, pattern(6, 10_000)).unwrap();
    ok(env, &["put", local.to_str().unwrap(), "/one.bin"]);
    let mnt = work.join("mnt");
    std::fs::create_dir(&mnt).unwrap();

    // `umount` from outside: the process notices and exits 0.
    let mut mount = Mount::start(env, &mnt, &work.join("mount-1.log"));
    let umount = Command::new("umount").arg(&mnt).status().unwrap();
    assert!(umount.success());
    let mut child = mount.child.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running after umount:\n{}",
            mount.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}:\n{}", mount.log());
    drop(mount);

    // SIGTERM while a file is open below the mount point: detached, the process exits 0.
    let mut mount = Mount::start(env, &mnt, &work.join("mount-2.log"));
    let open = File::open(mnt.join("one.bin")).unwrap();
    let status = mount.terminate();
    assert!(status.success(), "{status}:\n{}", mount.log());
    assert!(!is_mounted(&mnt), "a busy mount is detached");
    drop(open);
    assert_eq!(names(&mnt), Vec::<String>::new());
}

/// An open file reads only the version it opened, whatever another client commits meanwhile
/// (up to the current size, where the kernel ends reads); the next open sees the new version. `O_EXCL` creates are
/// atomic.
#[test]
#[ignore = "needs /dev/fuse and root: run by hwtests/run fuse"]
fn an_open_file_keeps_its_version_and_exclusive_creates_are_atomic() {
    use std::io::{Read, Seek, SeekFrom};
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let cluster = Cluster::up(&work.join("cluster"));
    let env = &cluster.env;
    let old = pattern(11, 900_001);
    let new = pattern(12, 300_003);
    std::fs::write(work.join("old"), &old).unwrap();
    std::fs::write(work.join("new"), &new).unwrap();
    ok(env, &["put", work.join("old").to_str().unwrap(), "/f"]);
    let mnt = work.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _mount = Mount::start(env, &mnt, &work.join("mount.log"));

    let mut file = std::fs::File::open(mnt.join("f")).unwrap();
    let mut head = vec![0u8; 100_000];
    file.read_exact(&mut head).unwrap();
    ok(env, &["put", work.join("new").to_str().unwrap(), "/f"]);
    // Give the daemons time to hear of the new layout version (heartbeats): the handle must
    // still read its own version, refused or not.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let mut rest = Vec::new();
    file.read_to_end(&mut rest).unwrap();
    head.extend_from_slice(&rest);
    // Every byte from the opened version; the kernel ends reads at the file's current size
    // (the new, shorter version's), as SEMANTICS.md says.
    assert!(old.starts_with(&head), "an open file mixed versions");
    assert_eq!(head.len(), new.len());
    file.seek(SeekFrom::Start(150_000)).unwrap();
    let mut middle = vec![0u8; 100_001];
    file.read_exact(&mut middle).unwrap();
    assert!(
        middle[..] == old[150_000..250_001],
        "a seek read the new version's bytes"
    );
    drop(file);
    assert!(
        std::fs::read(mnt.join("f")).unwrap() == new,
        "a new open sees the new version"
    );

    let exclusive = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(mnt.join("once"))
    };
    let first = exclusive().unwrap();
    assert_eq!(exclusive().unwrap_err().raw_os_error(), Some(libc::EEXIST));
    drop(first);
}
