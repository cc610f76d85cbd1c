//! The store on S3-compatible object storage (`--store s3://bucket/prefix`) against real
//! servers on loopback: moto's server mode and SeaweedFS (`.ci/s3/up.sh`, installed by
//! `.ci/setup`). Skipped, saying why, where the servers' venv is missing or they cannot start.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use flag::store::remote::{Remote, S3Url};

const BUCKET: &str = "flag-test";
/// The test servers' only identity (see .ci/s3/up.sh); a leak check looks for the secret.
const SECRET: &str = "flagtestsecret";

/// A running S3 server: its endpoint and the environment a client needs.
#[derive(Clone)]
struct Server {
    name: &'static str,
    endpoint: String,
    env: BTreeMap<String, String>,
}

/// Runs `.ci/s3/up.sh WHICH` with extra environment; the `export` lines it prints.
fn up(which: &str, extra: &[(&str, &str)]) -> Result<BTreeMap<String, String>, String> {
    let venv = std::env::var_os("FLAG_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/flag"))
        .join("s3-venv");
    if !venv.join("bin/weed").exists() || !venv.join("bin/moto_server").exists() {
        return Err(format!(
            "the S3 test servers are not installed ({} lacks weed or moto_server; \
             .ci/setup installs them)",
            venv.display()
        ));
    }
    let mut c = Command::new("bash");
    c.arg(repo_root().join(".ci/s3/up.sh")).arg(which);
    for (k, v) in extra {
        c.env(k, v);
    }
    let out = c.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(".ci/s3/up.sh {which} failed:\n{}", stderr(&out)));
    }
    let mut env = BTreeMap::new();
    for line in stdout(&out).lines() {
        for pair in line
            .strip_prefix("export ")
            .unwrap_or("")
            .split_whitespace()
        {
            if let Some((k, v)) = pair.split_once('=') {
                env.insert(k.to_string(), v.trim_matches(['\'', '"']).to_string());
            }
        }
    }
    Ok(env)
}

/// moto and SeaweedFS on their default ports, started once per test binary. Skipped only
/// where the servers are not installed; installed servers that fail to start fail the tests.
fn servers() -> Option<Vec<Server>> {
    static UP: OnceLock<Result<BTreeMap<String, String>, String>> = OnceLock::new();
    match UP.get_or_init(|| up("both", &[])) {
        Err(why) if why.contains("not installed") => {
            eprintln!("SKIPPED: {why}");
            None
        }
        Err(why) => panic!("{why}"),
        Ok(env) => Some(
            [
                ("moto", "FLAG_S3_MOTO_ENDPOINT"),
                ("seaweedfs", "FLAG_S3_SEAWEEDFS_ENDPOINT"),
            ]
            .iter()
            .map(|(name, var)| {
                let endpoint = env[*var].clone();
                let mut env = env.clone();
                env.insert("AWS_ENDPOINT_URL".into(), endpoint.clone());
                Server {
                    name,
                    endpoint,
                    env,
                }
            })
            .collect(),
        ),
    }
}

/// A prefix of its own for each test and server, so tests share one bucket.
fn prefix(test: &str, server: &Server) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{test}-{}-{}-{nanos}", server.name, std::process::id())
}

fn url(prefix: &str) -> String {
    format!("s3://{BUCKET}/{prefix}")
}

/// A client of the bucket for the test's own inspection (not through flag).
fn remote(server: &Server, prefix: &str) -> Remote {
    let u = S3Url::parse(&url(prefix)).unwrap().unwrap();
    Remote::connect_with(
        &u,
        &[
            ("aws_endpoint", server.endpoint.as_str()),
            (
                "aws_access_key_id",
                server.env["AWS_ACCESS_KEY_ID"].as_str(),
            ),
            ("aws_secret_access_key", SECRET),
            ("aws_region", server.env["AWS_REGION"].as_str()),
            ("aws_allow_http", "true"),
        ],
    )
    .unwrap()
}

/// `flag` with the store at `s3://flag-test/<prefix>`, its local copy in `cache`.
fn flag_s3(root: &Path, server: &Server, prefix: &str, cache: &Path) -> Command {
    let mut c = flag(root, Path::new(&url(prefix)));
    for (k, v) in &server.env {
        c.env(k, v);
    }
    c.env("FLAG_STORE_CACHE", cache);
    c
}

fn run_small(c: &mut Command) -> &mut Command {
    c.args(["run", "pipelines/test-small.yaml", "--json", "--set"])
        .arg(format!("data_dir={}", data_dir().display()))
}

fn project() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    copy_project(root.path());
    root
}

/// Every file under `dir`, relative, with its size.
fn files(dir: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let len = p.metadata().unwrap().len();
                out.insert(p.strip_prefix(dir).unwrap().display().to_string(), len);
            }
        }
    }
    out
}

fn bucket_files(r: &Remote, under: &str) -> BTreeMap<String, u64> {
    r.list(under).unwrap().into_iter().collect()
}

#[test]
fn a_pipeline_on_s3_gives_the_bytes_of_a_local_run_and_verify_gc_show_path_work() {
    let Some(servers) = servers() else { return };
    for server in &servers {
        let root = project();
        let local_store = root.path().join("local");
        let local = run_ok(run_small(&mut flag(root.path(), &local_store)));
        let prefix = prefix("bytes", server);
        let cache = root.path().join("cache1");
        let first = run_ok(run_small(&mut flag_s3(
            root.path(),
            server,
            &prefix,
            &cache,
        )));
        assert!(
            statuses(&first).values().all(|s| s == "ran"),
            "{}: {:?}",
            server.name,
            statuses(&first)
        );
        assert_eq!(
            output_hashes(&first),
            output_hashes(&local),
            "{}",
            server.name
        );
        // The bucket holds the same objects as the local store, a manifest per run, the refs.
        let r = remote(server, &prefix);
        let objects: BTreeMap<String, u64> = files(&local_store.join("objects"))
            .into_iter()
            .map(|(k, v)| (format!("objects/{k}"), v))
            .collect();
        assert_eq!(bucket_files(&r, "objects/"), objects, "{}", server.name);
        assert_eq!(
            bucket_files(&r, "manifests/").len(),
            files(&local_store.join("manifests")).len()
        );
        assert_eq!(
            r.get_small("refs/test-small/report")
                .unwrap()
                .unwrap()
                .bytes,
            std::fs::read(local_store.join("refs/test-small/report")).unwrap()
        );

        // Another machine (a new local copy) finds everything done.
        let cache2 = root.path().join("cache2");
        let second = run_ok(run_small(&mut flag_s3(
            root.path(),
            server,
            &prefix,
            &cache2,
        )));
        assert!(
            statuses(&second).values().all(|s| s == "cached"),
            "{:?}",
            statuses(&second)
        );
        assert_eq!(output_hashes(&second), output_hashes(&local));

        // path prints the object's URL; show --sql reads it through DataFusion.
        let cache3 = root.path().join("cache3");
        let path = run_ok(
            flag_s3(root.path(), server, &prefix, &cache3).args(["path", "indicators.table"]),
        );
        let hash = &output_hashes(&local)["indicators"]["table"];
        assert_eq!(
            stdout(&path).trim(),
            format!(
                "s3://{BUCKET}/{prefix}/objects/{}/{hash}.parquet",
                &hash[..2]
            )
        );
        let rows = records(&local)["indicators"]["outputs"]["table"]["rows"]
            .as_u64()
            .unwrap();
        let show = run_ok(flag_s3(root.path(), server, &prefix, &cache3).args([
            "show",
            "indicators.table",
            "--sql",
            "SELECT count(*) AS n FROM t",
        ]));
        assert!(
            stdout(&show).contains(&format!("| {rows} ")),
            "{rows} rows expected:\n{}",
            stdout(&show)
        );

        // verify: intact; then an object damaged in the bucket is found, dropped with its run,
        // and the next run recomputes exactly that.
        let verify = run_ok(flag_s3(root.path(), server, &prefix, &cache3).arg("verify"));
        assert!(
            stdout(&verify).contains("all intact"),
            "{}",
            stdout(&verify)
        );
        let victim = format!("objects/{}/{hash}.parquet", &hash[..2]);
        r.put(&victim, b"not the table".to_vec()).unwrap();
        let verify = flag_s3(root.path(), server, &prefix, &cache3)
            .arg("verify")
            .output()
            .unwrap();
        assert_eq!(verify.status.code(), Some(1), "{}", stdout(&verify));
        assert!(
            stdout(&verify).contains(&format!("CORRUPT indicators.table: {}", r.url_of(&victim))),
            "{}",
            stdout(&verify)
        );
        assert_eq!(
            r.size(&victim).unwrap(),
            None,
            "the corrupted object was dropped"
        );
        let third = run_ok(run_small(&mut flag_s3(
            root.path(),
            server,
            &prefix,
            &cache3,
        )));
        assert_eq!(statuses(&third)["indicators"], "ran");
        assert_eq!(statuses(&third)["ohlcv"], "cached");
        assert_eq!(output_hashes(&third), output_hashes(&local));
        let verify = run_ok(flag_s3(root.path(), server, &prefix, &cache3).arg("verify"));
        assert!(
            stdout(&verify).contains("all intact"),
            "{}",
            stdout(&verify)
        );

        // gc: an object named like the store's but used by no run goes; a foreign one stays.
        let orphan = format!("objects/ab/ab{}.parquet", "0".repeat(62));
        r.put(&orphan, b"orphan".to_vec()).unwrap();
        r.put("objects/notes.txt", b"mine".to_vec()).unwrap();
        // Not at once: a fresh object no run names may be a commit in flight.
        let gc = run_ok(flag_s3(root.path(), server, &prefix, &cache3).arg("gc"));
        assert!(
            stdout(&gc).contains("removed 0 runs, 0 objects"),
            "{}",
            stdout(&gc)
        );
        assert!(
            stderr(&gc).contains("kept 1 objects no run names yet"),
            "{}",
            stderr(&gc)
        );
        assert_eq!(r.size(&orphan).unwrap(), Some(6));
        let gc = run_ok(
            flag_s3(root.path(), server, &prefix, &cache3)
                .env("FLAG_S3_GC_GRACE_SECS", "0")
                .arg("gc"),
        );
        assert!(
            stdout(&gc).contains("removed 0 runs, 1 objects"),
            "{}",
            stdout(&gc)
        );
        assert_eq!(r.size(&orphan).unwrap(), None);
        assert_eq!(r.size("objects/notes.txt").unwrap(), Some(4));
        assert_eq!(bucket_files(&r, "objects/").len(), objects.len() + 1);

        // The credentials are nowhere: not in the bucket, the local copies, or the output.
        for (rel, size) in r.list("").unwrap() {
            if size < 64 << 20 {
                let bytes = match r.get_small(&rel).unwrap() {
                    Some(f) => f.bytes,
                    None => continue,
                };
                assert!(
                    !String::from_utf8_lossy(&bytes).contains(SECRET),
                    "{rel} holds the secret"
                );
            }
        }
        for dir in [&cache, &cache2, &cache3] {
            for (rel, _) in files(dir) {
                let bytes = std::fs::read(dir.join(&rel)).unwrap_or_default();
                assert!(
                    !String::from_utf8_lossy(&bytes).contains(SECRET),
                    "{rel} holds the secret"
                );
            }
        }
        for out in [&first, &second, &third] {
            assert!(!stdout(out).contains(SECRET) && !stderr(out).contains(SECRET));
        }
    }
}

#[test]
fn two_coordinators_on_one_bucket_at_once_compute_each_stage_once() {
    let Some(servers) = servers() else { return };
    for server in &servers {
        let root = project();
        let prefix = prefix("two", server);
        let spawn = |cache: &str| {
            run_small(&mut flag_s3(
                root.path(),
                server,
                &prefix,
                &root.path().join(cache),
            ))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        };
        let (a, b) = (spawn("a"), spawn("b"));
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        for out in [&a, &b] {
            assert!(out.status.success(), "{}: {}", server.name, stderr(out));
        }
        assert_eq!(output_hashes(&a), output_hashes(&b));
        // The lease serialised them: every stage ran in exactly one of the two.
        let (sa, sb) = (statuses(&a), statuses(&b));
        for (stage, s) in &sa {
            let pair = (s.as_str(), sb[stage].as_str());
            assert!(
                pair == ("ran", "cached") || pair == ("cached", "ran"),
                "{}: stage {stage}: {pair:?}",
                server.name
            );
        }
        assert!(
            stderr(&a).contains("waiting for another flag run")
                || stderr(&b).contains("waiting for another flag run")
        );
        let verify =
            run_ok(flag_s3(root.path(), server, &prefix, &root.path().join("c")).arg("verify"));
        assert!(
            stdout(&verify).contains("verified 5 runs"),
            "{}",
            stdout(&verify)
        );
        assert!(
            stdout(&verify).contains("all intact"),
            "{}",
            stdout(&verify)
        );
    }
}

#[test]
fn a_prefix_that_is_not_a_store_is_refused_and_left_alone() {
    let Some(servers) = servers() else { return };
    let server = &servers[0];
    let root = project();
    let prefix = prefix("foreign", server);
    let r = remote(server, &prefix);
    r.put("data/prices.csv", b"date,close\n".to_vec()).unwrap();
    let out = run_small(&mut flag_s3(
        root.path(),
        server,
        &prefix,
        &root.path().join("c"),
    ))
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("not a flag store"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        bucket_files(&r, ""),
        BTreeMap::from([("data/prices.csv".to_string(), 11)])
    );
    // And a read-only command on an empty prefix creates nothing.
    let empty = prefix.clone() + "-empty";
    let out = flag_s3(root.path(), server, &empty, &root.path().join("c"))
        .arg("verify")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no store here yet"),
        "{}",
        stderr(&out)
    );
    assert!(bucket_files(&remote(server, &empty), "").is_empty());
}

#[test]
fn a_coordinator_killed_with_minus_9_blocks_the_store_only_until_its_lease_expires() {
    let Some(servers) = servers() else { return };
    let server = &servers[0];
    let root = project();
    let prefix = prefix("lease", server);
    let r = remote(server, &prefix);
    let mut child = run_small(
        flag_s3(root.path(), server, &prefix, &root.path().join("a"))
            .env("FLAG_S3_LEASE_SECS", "4"),
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    // Killed once it holds the lease and has committed something.
    wait_for_a_commit(&r);
    child.kill().unwrap();
    child.wait().unwrap();
    let lease = String::from_utf8(r.get_small("lock").unwrap().unwrap().bytes).unwrap();
    assert!(lease.contains(&format!("pid {}", child.id())), "{lease}");
    let started = Instant::now();
    let out = run_ok(run_small(
        flag_s3(root.path(), server, &prefix, &root.path().join("b"))
            .env("FLAG_S3_LEASE_SECS", "4"),
    ));
    assert!(
        stderr(&out).contains(&format!("waiting for another flag run (pid {}", child.id())),
        "{}",
        stderr(&out)
    );
    // Blocked for the rest of the dead run's lease (at most 4 s), not for good; the rest is
    // the run itself.
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(started.elapsed() < Duration::from_secs(40));
    assert!(statuses(&out).values().any(|s| s == "cached"));
    let verify =
        run_ok(flag_s3(root.path(), server, &prefix, &root.path().join("c")).arg("verify"));
    assert!(
        stdout(&verify).contains("all intact"),
        "{}",
        stdout(&verify)
    );
}

/// A TCP proxy in front of a server that, on the `nth` PUT of an object under `objects/`,
/// passes the request's head and half its body, then kills the server with -9. Returns the
/// proxy's endpoint and the object path it cut.
fn killing_proxy(
    upstream: String,
    nth: usize,
    server_pid: u32,
) -> (String, Arc<Mutex<Option<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let cut = Arc::new(Mutex::new(None::<String>));
    let seen = Arc::new(AtomicUsize::new(0));
    let cut2 = cut.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(upstream.trim_start_matches("http://")) else {
                let _ = client.shutdown(Shutdown::Both);
                continue;
            };
            let (seen, cut) = (seen.clone(), cut2.clone());
            let (mut c_read, mut s_write) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (mut s_read, mut c_write) = (server, client);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_read, &mut c_write);
                let _ = c_write.shutdown(Shutdown::Both);
            });
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 65536];
                loop {
                    // One request: its head, then Content-Length bytes of body.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match c_read.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let first = head.lines().next().unwrap_or("").to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        match c_read.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let is_object_put = first.starts_with("PUT ")
                        && first.contains("/objects/")
                        && !first.contains("uploadId");
                    if is_object_put && seen.fetch_add(1, Ordering::SeqCst) + 1 == nth {
                        let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
                        *cut.lock().unwrap() = Some(path);
                        let _ = s_write.write_all(&buf[..head_end + len / 2]);
                        let _ = s_write.flush();
                        std::thread::sleep(Duration::from_millis(200));
                        let _ = Command::new("kill")
                            .args(["-9", &server_pid.to_string()])
                            .status();
                        let _ = s_write.shutdown(Shutdown::Both);
                        return;
                    }
                    if s_write.write_all(&buf[..head_end + len]).is_err() {
                        return;
                    }
                    buf.drain(..head_end + len);
                }
            });
        }
    });
    (endpoint, cut)
}

#[test]
fn the_server_killed_in_the_middle_of_an_upload_leaves_nothing_partial_and_the_next_run_completes()
{
    if servers().is_none() {
        return;
    }
    // A SeaweedFS of its own (it keeps its data on disk across the kill), on other ports, so
    // the other tests' server stays up.
    let state = OwnWeed(tempfile::tempdir().unwrap());
    let state_dir = state.0.path().to_str().unwrap().to_string();
    let own = [
        ("FLAG_S3_DIR", state_dir.as_str()),
        ("FLAG_S3_WEED_PORT", "5156"),
    ];
    let env = match up("seaweedfs", &own) {
        Ok(env) => env,
        Err(why) => panic!("a second SeaweedFS did not start: {why}"),
    };
    let pid: u32 = std::fs::read_to_string(state.0.path().join("seaweedfs.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let direct = Server {
        name: "seaweedfs",
        endpoint: env["AWS_ENDPOINT_URL"].clone(),
        env: env.clone(),
    };
    // The third object's upload is cut: ohlcv's two outputs are stored by then.
    let (proxy, cut) = killing_proxy(direct.endpoint.clone(), 3, pid);
    let mut through = direct.clone();
    through.endpoint = proxy.clone();
    through.env.insert("AWS_ENDPOINT_URL".into(), proxy.clone());
    through.env.insert("AWS_ENDPOINT".into(), proxy);
    let root = project();
    let prefix = prefix("killed", &direct);
    let out = run_small(
        flag_s3(root.path(), &through, &prefix, &root.path().join("a"))
            .env("FLAG_S3_RETRY_SECS", "3")
            .env("FLAG_S3_LEASE_SECS", "3"),
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let cut = cut.lock().unwrap().clone().expect("an upload was cut");
    let failed: Vec<String> = records(&out)
        .into_iter()
        .filter(|(_, r)| r["status"] == "failed")
        .map(|(s, _)| s)
        .collect();
    assert!(!failed.is_empty(), "{}", stdout(&out));
    // The failure names the object and the bucket, not the credentials.
    let error = records(&out)[&failed[0]]["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        error.contains(&format!("s3://{BUCKET}/{prefix}/")),
        "{error}"
    );
    assert!(!error.contains(SECRET));

    // Restarted on its data: nothing partial is visible.
    let env = up("seaweedfs", &own).expect("SeaweedFS restarts");
    let restarted: u32 = std::fs::read_to_string(state.0.path().join("seaweedfs.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_ne!(restarted, pid, "the server was not killed");
    assert_eq!(env["AWS_ENDPOINT_URL"], direct.endpoint);
    let r = remote(&direct, &prefix);
    let cut_rel = cut
        .split_once(&format!("/{prefix}/"))
        .map(|(_, rel)| rel.to_string())
        .unwrap_or_else(|| panic!("{cut} is not under the prefix"));
    assert_eq!(
        r.size(&cut_rel).unwrap(),
        None,
        "a partial {cut_rel} is visible"
    );
    let manifests: BTreeSet<String> = bucket_files(&r, "manifests/").into_keys().collect();
    assert!(!manifests.is_empty(), "ohlcv was committed before the cut");
    let verify =
        run_ok(flag_s3(root.path(), &direct, &prefix, &root.path().join("v")).arg("verify"));
    assert!(
        stdout(&verify).contains("all intact"),
        "{}",
        stdout(&verify)
    );
    for (_, _, key) in remote_refs(&r) {
        assert!(manifests.contains(&format!("manifests/{}/{key}.json", &key[..2])));
    }
    // The next run completes (after the dead run's lease expires) and matches a local run.
    let again = run_ok(run_small(
        flag_s3(root.path(), &direct, &prefix, &root.path().join("a"))
            .env("FLAG_S3_LEASE_SECS", "3"),
    ));
    let local = run_ok(run_small(&mut flag(
        root.path(),
        &root.path().join("local"),
    )));
    assert_eq!(output_hashes(&again), output_hashes(&local));
    assert_eq!(statuses(&again)["ohlcv"], "cached");
}

/// The test's own SeaweedFS: stopped (SIGKILL) and wiped when the test ends, pass or fail.
struct OwnWeed(tempfile::TempDir);

impl Drop for OwnWeed {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo_root().join(".ci/s3/down.sh"))
            .args(["seaweedfs", "--wipe"])
            .env("FLAG_S3_DIR", self.0.path())
            .env("FLAG_S3_STOP_WAIT_S", "0")
            .output();
    }
}

/// (pipeline, stage, key) of every ref in the bucket.
fn remote_refs(r: &Remote) -> Vec<(String, String, String)> {
    r.list("refs/")
        .unwrap()
        .into_iter()
        .filter_map(|(rel, _)| {
            let parts: Vec<&str> = rel.split('/').collect();
            let [_, p, s] = parts[..] else { return None };
            let key = String::from_utf8(r.get_small(&rel).unwrap()?.bytes).ok()?;
            Some((p.to_string(), s.to_string(), key.trim().to_string()))
        })
        .collect()
}

#[test]
fn a_coordinator_that_lost_its_lease_commits_nothing_more() {
    let Some(servers) = servers() else { return };
    let server = &servers[0];
    let root = project();
    let prefix = prefix("lost", server);
    let r = remote(server, &prefix);
    let a = run_small(
        flag_s3(root.path(), server, &prefix, &root.path().join("a"))
            .env("FLAG_S3_LEASE_SECS", "2"),
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_for_a_commit(&r);
    // A stalls (a paused VM, say) past its lease; B takes the store over and finishes.
    let signal = |sig: &str| {
        assert!(
            Command::new("kill")
                .args([sig, &a.id().to_string()])
                .status()
                .unwrap()
                .success()
        )
    };
    signal("-STOP");
    let b = run_small(
        flag_s3(root.path(), server, &prefix, &root.path().join("b"))
            .env("FLAG_S3_LEASE_SECS", "2"),
    )
    .output()
    .unwrap();
    signal("-CONT");
    let a = a.wait_with_output().unwrap();
    assert!(b.status.success(), "{}", stderr(&b));
    assert_eq!(a.status.code(), Some(1), "{}", stderr(&a));
    let errors: Vec<String> = records(&a)
        .values()
        .filter_map(|r| r["error"].as_str().map(str::to_string))
        .collect();
    assert!(
        errors.iter().any(|e| e.contains("lost the store's lease")),
        "{errors:?}"
    );
    // What the bucket says is B's work, whole.
    let refs: BTreeMap<String, String> = remote_refs(&r)
        .into_iter()
        .map(|(_, stage, key)| (stage, key))
        .collect();
    for (stage, rec) in records(&b) {
        assert_eq!(refs[&stage], rec["key"].as_str().unwrap(), "{stage}");
    }
    let verify =
        run_ok(flag_s3(root.path(), server, &prefix, &root.path().join("c")).arg("verify"));
    assert!(
        stdout(&verify).contains("all intact"),
        "{}",
        stdout(&verify)
    );
}

/// Waits until a run has committed something into the bucket (a manifest is there).
fn wait_for_a_commit(r: &Remote) {
    let until = Instant::now() + Duration::from_secs(60);
    while r.list("manifests/").unwrap().is_empty() {
        assert!(Instant::now() < until, "no run committed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ctrl_c_gives_the_lease_back_so_the_next_run_does_not_wait() {
    let Some(servers) = servers() else { return };
    let server = &servers[0];
    let root = project();
    let prefix = prefix("ctrlc", server);
    let r = remote(server, &prefix);
    // The default lease (30 s): a run that waited it out would show.
    let a = run_small(&mut flag_s3(
        root.path(),
        server,
        &prefix,
        &root.path().join("a"),
    ))
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_for_a_commit(&r);
    assert!(
        Command::new("kill")
            .args(["-INT", &a.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let a = a.wait_with_output().unwrap();
    assert_eq!(a.status.code(), Some(130), "{}", stderr(&a));
    assert!(
        stderr(&a).contains("gave the lease of s3://"),
        "{}",
        stderr(&a)
    );
    let started = Instant::now();
    let b = run_ok(run_small(&mut flag_s3(
        root.path(),
        server,
        &prefix,
        &root.path().join("b"),
    )));
    assert!(
        !stderr(&b).contains("waiting for another flag run"),
        "{}",
        stderr(&b)
    );
    assert!(started.elapsed() < Duration::from_secs(25));
    let verify =
        run_ok(flag_s3(root.path(), server, &prefix, &root.path().join("c")).arg("verify"));
    assert!(
        stdout(&verify).contains("all intact"),
        "{}",
        stdout(&verify)
    );
}
