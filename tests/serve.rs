//! `flag serve` and the OpenAI-compatible backend, with the real SmolLM2 and MiniLM models and
//! real processes on loopback (127.0.0.1) only: the API's shapes, greedy answers and scores
//! equal to the embedded backend's, embeddings, errors, and the strategist stage run through
//! HTTP against the server giving the embedded run's signals without the API key ever
//! reaching the store. Every wait is bounded; the server is killed on drop (also on panic).
mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use flag_core::arrow::array::{Array, BooleanArray, Float64Array, Int64Array, StringArray};
use flag_llm::backend::openai::{OpenAiBackend, OpenAiSettings};
use flag_llm::backend::{EmbeddedBackend, LlmBackend, LlmRequest};
use flag_llm::generate::{FinishReason, GenerateOptions};
use serde_json::{Value, json};

/// A running `flag serve`, killed when dropped.
struct Server {
    child: Child,
    url: String,
    stderr: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `flag serve --port 0` and waits (at most 5 minutes) for its address line.
    fn start(dir: &Path, envs: &[(&str, &str)], extra: &[&str]) -> Server {
        let stderr = dir.join("serve.stderr");
        let mut child = Command::new(flag_bin())
            // One intra-op thread: CI has 2 cores, shared with the test and other binaries,
            // and OpenMP threads waiting on each other under contention are much slower.
            .args([
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--threads",
                "1",
            ])
            .args(extra)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn flag serve");
        let stdout = child.stdout.take().unwrap();
        let mut server = Server {
            child,
            url: String::new(),
            stderr,
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(Duration::from_secs(300))
            .unwrap_or_else(|_| panic!("flag serve printed no address:\n{}", server.log()));
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        assert!(addr.starts_with("http://127.0.0.1:"), "{addr}");
        server.url = format!("{addr}/v1");
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(300)))
        .http_status_as_error(false)
        .proxy(None)
        .build()
        .into()
}

/// POSTs `body` (raw bytes), returns (status, parsed JSON answer).
fn post(url: &str, body: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = agent().post(url).header("Content-Type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut resp = req.send(body).expect("HTTP request");
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, v)
}

fn smollm2() -> PathBuf {
    flag_llm::models::smollm2_gguf(None).expect("SmolLM2 GGUF must be installed")
}

fn http_backend(url: &str, key: Option<String>) -> OpenAiBackend {
    OpenAiBackend::with_key(
        OpenAiSettings {
            base_url: url.to_string(),
            model: "SmolLM2-135M-Instruct".into(),
            api_key_env: "UNUSED".into(),
            timeout: Duration::from_secs(300),
        },
        key,
    )
    .unwrap()
}

const PREFILL: &str = "{\"direction\": \"";

fn requests() -> Vec<LlmRequest> {
    [
        "Prices rose 5% this week on strong volume. Answer with JSON: {\"direction\": \"LONG\" or \"SHORT\", \"confidence\": 1-3}.",
        "A stock fell for ten days in a row. Should a trader go LONG or SHORT? Answer with JSON.",
        "Name a colour.",
    ]
    .iter()
    .map(|u| LlmRequest::text(*u, PREFILL))
    .collect()
}

#[test]
fn serve_answers_like_the_embedded_backend() {
    let tmp = tempfile::tempdir().unwrap();
    // Requests arriving within 300 ms of each other are decoded as one batch.
    let server = Server::start(tmp.path(), &[], &["--batch-wait-ms", "300"]);
    let chat = format!("{}/chat/completions", server.url);

    // (a) The API shape of a greedy chat completion with logprobs.
    let body = json!({
        "model": "anything",
        "messages": [{"role": "user", "content": requests()[0].user},
                     {"role": "assistant", "content": PREFILL}],
        "temperature": 0, "seed": 3, "max_tokens": 24,
        "logprobs": true, "top_logprobs": 5,
    });
    let (status, v) = post(&chat, &body.to_string(), &[]);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    let choice = &v["choices"][0];
    let content = choice["message"]["content"].as_str().unwrap();
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()));
    let entries = choice["logprobs"]["content"].as_array().unwrap();
    assert!(!entries.is_empty() && entries.len() <= 24);
    assert_eq!(v["usage"]["completion_tokens"], entries.len());
    assert_eq!(
        v["usage"]["total_tokens"].as_u64().unwrap(),
        v["usage"]["prompt_tokens"].as_u64().unwrap() + entries.len() as u64
    );
    let mut text_bytes = Vec::new();
    for e in entries {
        let lp = e["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0, "{e}");
        assert!(e["token"].is_string());
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 5, "{e}");
        let tops: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(tops.windows(2).all(|w| w[0] >= w[1]), "{tops:?}");
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], e["token"]);
        assert_eq!(tops[0], lp);
        text_bytes.extend(
            e["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8),
        );
    }
    // The tokens spell the content (then the end-of-turn token, when the answer ended).
    let spelled = String::from_utf8_lossy(&text_bytes).to_string();
    assert!(spelled.starts_with(content), "{spelled:?} vs {content:?}");

    // ... and equals the embedded backend's greedy answer, scores included, for one request
    // and for a batch sent concurrently.
    flag_llm::generate::set_threads(1);
    let embedded = EmbeddedBackend::load(&smollm2(), tch::Device::Cpu).unwrap();
    let http = http_backend(&server.url, None);
    let opts = GenerateOptions {
        max_tokens: 24,
        temperature: 0.0,
        top_k_entropy: 10,
        chat: true,
        ..GenerateOptions::default()
    };
    let want = embedded.generate(&requests()[..1], &opts).unwrap();
    assert_eq!(want[0].text, content, "server vs embedded greedy text");
    let reqs = requests();
    // Also with generation ending where the prefilled JSON object closes (as the stages do).
    let json_opts = GenerateOptions {
        json_prefill: Some(PREFILL.to_string()),
        max_tokens: 48,
        ..opts.clone()
    };
    let mut pairs = Vec::new();
    for o in [&opts, &json_opts] {
        let want = embedded.generate(&reqs, o).unwrap();
        let got = http.generate(&reqs, o).unwrap();
        assert_eq!(got.len(), reqs.len());
        pairs.extend(want.into_iter().zip(got));
    }
    assert!(
        pairs[3..]
            .iter()
            .any(|(w, _)| w.finish_reason == FinishReason::Stop),
        "no answer closed its JSON object: {pairs:?}"
    );
    for (w, g) in &pairs {
        assert_eq!(g.text, w.text);
        assert_eq!(g.finish_reason, w.finish_reason);
        assert_eq!(g.ids.len(), w.ids.len());
        for (a, b) in g.logprobs.iter().zip(&w.logprobs) {
            assert!((a - b).abs() < 1e-4, "logprob {a} vs {b}");
        }
        for (a, b) in g.entropies.iter().zip(&w.entropies) {
            assert!((a - b).abs() < 1e-4, "entropy {a} vs {b}");
        }
        assert!((g.entropy - w.entropy).abs() < 1e-4);
        assert!((g.perplexity / w.perplexity - 1.0).abs() < 1e-3);
        // Decoding growing prefixes (how the signal finds the decision token) agrees.
        let n = if w.finish_reason == FinishReason::Eos {
            w.ids.len() - 1
        } else {
            w.ids.len()
        };
        for i in 1..=n {
            assert_eq!(
                http.decode(&g.ids[..i]).unwrap(),
                embedded.decode(&w.ids[..i]).unwrap()
            );
        }
    }

    // With a JSON Schema (the strategist's P3): the HTTP backend sends it as response_format,
    // the server's constrained decoder gives the embedded backend's greedy answers, and each
    // answer checks out against the schema on the client side too.
    let schema = flag_llm::constrain::Constraint::from_file(
        &repo_root().join("prompts/strategist/P3.schema.json"),
    )
    .unwrap();
    let constrained = GenerateOptions {
        constraint: Some(schema),
        max_tokens: 160,
        ..opts.clone()
    };
    let plain: Vec<LlmRequest> = reqs
        .iter()
        .map(|r| LlmRequest::text(r.user.clone(), ""))
        .collect();
    let want = embedded.generate(&plain, &constrained).unwrap();
    let got = http.generate(&plain, &constrained).unwrap();
    assert!(embedded.enforces_schema() && !http.enforces_schema());
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(g.text, w.text, "constrained answers differ");
        assert_eq!((&w.error, &g.error), (&None, &None), "{}", g.text);
        let v: Value = serde_json::from_str(&g.text).unwrap_or_else(|e| panic!("{e}: {}", g.text));
        assert!(
            ["LONG", "SHORT"].contains(&v["direction"].as_str().unwrap()),
            "{v}"
        );
        let c = g
            .constrained
            .as_ref()
            .expect("constrained scores over HTTP");
        assert_eq!(c.logprobs.len(), g.ids.len());
        assert!(c.logprobs.iter().all(|&lp| lp <= 0.0), "{c:?}");
    }
    // The embeddings of the backend boundary: over HTTP equal to the in-process MiniLM.
    let texts = vec![
        "The market rallied.".to_string(),
        "Stocks fell.".to_string(),
    ];
    let (local, remote) = (embedded.embed(&texts).unwrap(), http.embed(&texts).unwrap());
    assert_eq!(local.len(), 2);
    for (a, b) in local.iter().zip(&remote) {
        assert_eq!(a.len(), 384);
        let cos: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        assert!(cos > 0.9999, "cosine {cos}");
    }

    // (b) Embeddings: 384-dim unit vectors, in input order; one string works too.
    let emb = format!("{}/embeddings", server.url);
    let (status, v) = post(
        &emb,
        &json!({"input": ["The market rallied.", "Stocks fell sharply."], "model": "x"})
            .to_string(),
        &[],
    );
    assert_eq!(status, 200, "{v}");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let vecs: Vec<Vec<f64>> = data
        .iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["index"], i);
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    for e in &vecs {
        assert_eq!(e.len(), 384);
        let norm = e.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }
    assert_ne!(vecs[0], vecs[1]);
    let (status, v) = post(&emb, r#"{"input": "The market rallied."}"#, &[]);
    assert_eq!(status, 200);
    let one: Vec<f64> = v["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let cos: f64 = one.iter().zip(&vecs[0]).map(|(a, b)| a * b).sum();
    assert!(cos > 0.9999, "same text, cosine {cos}");

    // (c) Malformed requests: 400 with an OpenAI-style error message.
    for (url, body, needle) in [
        (&chat, "{\"messages\": [", "not valid JSON"),
        (&chat, "not json at all", "not valid JSON"),
        (
            &chat,
            r#"{"messages": "hi"}"#,
            "'messages' must be a non-empty list",
        ),
        (
            &chat,
            r#"{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 50, "logprobs": true}"#,
            "top_logprobs",
        ),
        (&emb, r#"{"input": 42}"#, "'input' must be"),
        (
            &chat,
            r#"{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}}"#,
            "response_format",
        ),
    ] {
        let (status, v) = post(url, body, &[]);
        assert_eq!(status, 400, "{body}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    let (status, v) = post(&format!("{}/nope", server.url), "{}", &[]);
    assert_eq!(status, 404, "{v}");
    let mut resp = agent()
        .get(&format!("{}/models", server.url))
        .call()
        .unwrap();
    let models: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(models["data"].as_array().unwrap().len(), 2, "{models}");

    // The three concurrent requests were decoded together; one line per request, no bodies.
    let log = server.log();
    assert!(log.contains("decoded a batch of 3"), "{log}");
    assert!(log.contains("POST /v1/chat/completions -> 200"), "{log}");
    assert!(!log.contains("Prices rose"), "{log}");
}

fn f64s(b: &flag_core::arrow::array::RecordBatch, n: &str) -> Vec<f64> {
    let c = b
        .column_by_name(n)
        .unwrap()
        .as_any()
        .downcast_ref::<Float64Array>()
        .unwrap();
    (0..c.len())
        .map(|i| if c.is_null(i) { f64::NAN } else { c.value(i) })
        .collect()
}

fn strings(b: &flag_core::arrow::array::RecordBatch, n: &str) -> Vec<Option<String>> {
    let c = b
        .column_by_name(n)
        .unwrap()
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap();
    (0..c.len())
        .map(|i| (!c.is_null(i)).then(|| c.value(i).to_string()))
        .collect()
}

fn signals(root: &Path, store: &Path, stage: &str) -> flag_core::arrow::array::RecordBatch {
    let out = run_ok(flag(root, store).args([
        "path",
        &format!("{stage}.signals"),
        "--pipeline",
        "pipelines/serve-test.yaml",
    ]));
    let path = stdout(&out).trim().to_string();
    let (schema, batches) = flag_core::parquet_io::read_parquet_file(Path::new(&path)).unwrap();
    flag_core::arrow::compute::concat_batches(&schema, &batches).unwrap()
}

/// Every file under `dir` (symlinks not followed) whose bytes contain `needle`, and the number
/// of files searched.
fn files_containing(dir: &Path, needle: &[u8]) -> (Vec<PathBuf>, usize) {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut n_files = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file() {
                n_files += 1;
                let bytes = std::fs::read(&p).unwrap();
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    hits.push(p);
                }
            }
        }
    }
    (hits, n_files)
}

#[test]
fn strategist_over_http_matches_embedded_and_never_stores_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    copy_project(&root);
    let store = tmp.path().join("store");
    // A unique secret, so any copy of it anywhere is found.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let secret = format!(
        "sk-flagtest-{}",
        blake3::hash(format!("{nanos}-{}", std::process::id()).as_bytes()).to_hex()
    );
    const KEY_ENV: &str = "FLAG_TEST_SERVE_KEY";
    // The server demands the key, so a run that succeeds proves the stage sent it.
    let server = Server::start(
        tmp.path(),
        &[(KEY_ENV, &secret)],
        // The two tickers of a decision date arrive together: one batch, as embedded.
        &["--api-key-env", KEY_ENV, "--batch-wait-ms", "300"],
    );
    let (status, v) = post(
        &format!("{}/chat/completions", server.url),
        r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}"#,
        &[],
    );
    assert_eq!(status, 401, "{v}");

    // Two decision dates x two tickers; the same params but the backend for both stages.
    let common = r#"start: "2018-01-02"
      end: "2018-01-31"
      history: 5
      retries: 1"#;
    // Both stages constrain answers to P3's schema (the default): the embedded decoder masks,
    // the HTTP backend sends response_format and `flag serve` masks with the same engine.
    let yaml = format!(
        r#"name: serve-test
params:
  data_dir: {data}
stages:
  ohlcv:
    uses: ingest_ohlcv
    params:
      source: ${{data_dir}}/tdqn
      format: tdqn
      tickers: [AAPL, MSFT]
  indicators:
    uses: indicators
    inputs:
      bars: ohlcv.bars
  local:
    uses: strategist
    inputs:
      table: indicators.table
    params:
      {common}
  remote:
    uses: strategist
    inputs:
      table: indicators.table
    params:
      {common}
      backend: openai
      base_url: {url}
      api_model: SmolLM2-135M-Instruct
      api_key_env: {KEY_ENV}
"#,
        data = data_dir().display(),
        url = server.url,
    );
    std::fs::write(root.join("pipelines/serve-test.yaml"), yaml).unwrap();
    let run = |key: &str| {
        run_ok(
            flag(&root, &store)
                .args(["run", "pipelines/serve-test.yaml", "--json"])
                .env("FLAG_LLM_THREADS", "1")
                .env(KEY_ENV, key),
        )
    };
    let out = run(&secret);
    let st = statuses(&out);
    assert_eq!(
        (st["local"].as_str(), st["remote"].as_str()),
        ("ran", "ran")
    );

    // (d) The HTTP run's signals are the embedded run's.
    let (a, b) = (
        signals(&root, &store, "local"),
        signals(&root, &store, "remote"),
    );
    // 2018-01-02..01-31: 21 trading days per ticker, decisions on the 1st and 21st.
    assert_eq!(a.num_rows(), 42);
    assert_eq!(b.num_rows(), a.num_rows());
    for col in ["ticker", "explanation", "features", "raw_text", "error"] {
        assert_eq!(strings(&a, col), strings(&b, col), "column {col}");
    }
    for col in ["direction", "interaction", "strength"] {
        let (x, y) = (f64s(&a, col), f64s(&b, col));
        for (p, q) in x.iter().zip(&y) {
            assert!(
                (p - q).abs() < 1e-4 || (p.is_nan() && q.is_nan()),
                "{col}: {p} vs {q}"
            );
        }
    }
    let (ea, eb) = (f64s(&a, "entropy"), f64s(&b, "entropy"));
    for (p, q) in ea.iter().zip(&eb) {
        assert!((p - q).abs() < 1e-4, "entropy {p} vs {q}");
    }
    let (pa, pb) = (f64s(&a, "perplexity"), f64s(&b, "perplexity"));
    for (p, q) in pa.iter().zip(&pb) {
        assert!((p / q - 1.0).abs() < 1e-3, "perplexity {p} vs {q}");
    }
    let conf = |b: &flag_core::arrow::array::RecordBatch| {
        let c = b
            .column_by_name("confidence")
            .unwrap()
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .clone();
        (0..c.len())
            .map(|i| (!c.is_null(i)).then(|| c.value(i)))
            .collect::<Vec<_>>()
    };
    assert_eq!(conf(&a), conf(&b));
    let failed = |b: &flag_core::arrow::array::RecordBatch| {
        let c = b
            .column_by_name("failed")
            .unwrap()
            .as_any()
            .downcast_ref::<BooleanArray>()
            .unwrap()
            .clone();
        (0..c.len()).map(|i| c.value(i)).collect::<Vec<_>>()
    };
    assert_eq!(failed(&a), failed(&b));
    let decided = f64s(&b, "direction").iter().filter(|d| **d != 0.0).count();
    eprintln!(
        "strategist over HTTP: {decided} of 42 signal rows with a direction, all equal to the embedded run"
    );

    // (e) The key is nowhere in the store (manifests, logs, objects, refs), nor in the run's
    // output or the server's log; the manifest records the key's variable NAME and the URL.
    let (hits, searched) = files_containing(&store, secret.as_bytes());
    assert!(hits.is_empty(), "the API key was written to {hits:?}");
    assert!(searched >= 10, "the store holds only {searched} files");
    assert!(!stdout(&out).contains(&secret) && !stderr(&out).contains(&secret));
    assert!(!server.log().contains(&secret));
    let (manifests, _) = files_containing(&store.join("manifests"), b"\"api_key_env\"");
    assert!(!manifests.is_empty());
    let with_url: Vec<_> = manifests
        .iter()
        .filter(|m| {
            let t = std::fs::read_to_string(m).unwrap();
            t.contains(&server.url) && t.contains(KEY_ENV) && t.contains("SmolLM2-135M-Instruct")
        })
        .collect();
    assert_eq!(
        with_url.len(),
        1,
        "the remote stage's manifest: {manifests:?}"
    );
    // Another key is not another result: the key is not part of the cache key.
    let st = statuses(&run("sk-another-key"));
    assert_eq!(st["remote"], "cached");
}

/// The server's `host:port`.
fn host_port(server: &Server) -> String {
    server
        .url
        .strip_prefix("http://")
        .and_then(|u| u.strip_suffix("/v1"))
        .unwrap()
        .to_string()
}

/// Reads one HTTP response from `s`: (status, headers, body); every read waits at most 5 min.
fn read_response(s: &mut std::net::TcpStream) -> (u16, String, String) {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).expect("reading the response head");
        assert_eq!(
            n, 1,
            "the connection closed inside the response head: {buf:?}"
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .expect("a Content-Length");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("reading the response body");
    (status, head, String::from_utf8(body).unwrap())
}

/// A raw POST of `body` to `path`, written by another thread (the server may answer before
/// it has all of it), on a connection of its own; returns the connection (still open) and
/// the writer.
fn raw_post(
    addr: &str,
    path: &str,
    body: Vec<u8>,
) -> (std::net::TcpStream, std::thread::JoinHandle<()>) {
    use std::io::Write;
    let s = std::net::TcpStream::connect(addr).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(300))).unwrap();
    let mut w = s.try_clone().unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let writer = std::thread::spawn(move || {
        // The server may close after answering early: a failed write is expected then.
        let _ = w.write_all(head.as_bytes());
        let _ = w.write_all(&body);
    });
    (s, writer)
}

/// The value of one counter of `GET /metrics`.
fn metric(server: &Server, name: &str) -> u64 {
    let url = format!("{}/metrics", server.url.strip_suffix("/v1").unwrap());
    let mut resp = agent().get(&url).call().unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.body_mut().read_to_string().unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// Polls `GET /metrics` until `name` reaches `want` (at most 5 minutes, then fails).
fn wait_for_metric(server: &Server, name: &str, want: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let got = metric(server, name);
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} stayed {got}, not {want}:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Issue 15, items 4 and 5: a huge body is refused unread and a prompt that cannot fit is
/// refused untokenized; max_tokens above the server's cap is refused; the in-flight limit
/// answers 503; a client that goes away has its sequence dropped from the batch, so the
/// next request is served.
#[test]
fn serve_bounds_requests_and_drops_abandoned_sequences() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(
        tmp.path(),
        &[],
        &["--max-tokens-cap", "2000", "--max-pending", "1"],
    );
    let chat = format!("{}/chat/completions", server.url);
    let addr = host_port(&server);
    let short = json!({"messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2, "temperature": 0})
    .to_string();

    // (a) A 15 MB body: 413 from its Content-Length, the body never read nor parsed, and
    // the answer reaches the client although it sends the whole body (lingering close).
    let huge = json!({"messages": [{"role": "user", "content": "a".repeat(15_000_000)}]})
        .to_string()
        .into_bytes();
    let n_huge = huge.len();
    let (mut s, writer) = raw_post(&addr, "/v1/chat/completions", huge);
    let (status, head, body) = read_response(&mut s);
    writer.join().unwrap();
    assert_eq!(status, 413, "{head}{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["error"]["message"],
        format!(
            "the request body is {n_huge} bytes, over the limit of 8388608 bytes (flag serve --max-body-mb)"
        )
    );
    drop(s);
    assert_eq!(metric(&server, "flag_serve_rejected_too_large_total"), 1);

    // (b) 3 MB of text fits the body limit but not the context: refused from its byte
    // length, before tokenizing (only that check words its refusal "at least N tokens").
    let (status, v) = post(
        &chat,
        &json!({"messages": [{"role": "user", "content": "word ".repeat(600_000)}]}).to_string(),
        &[],
    );
    assert_eq!(status, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("the prompt is 3000") && msg.contains("bytes, so at least"),
        "{msg}"
    );
    assert!(
        msg.ends_with("cannot fit in the model context of 8192 tokens"),
        "{msg}"
    );

    // (c) max_tokens above the cap is refused (not clamped), under either name.
    for (field, n) in [("max_tokens", 2001), ("max_completion_tokens", 100_000)] {
        let (status, v) = post(
            &chat,
            &json!({"messages": [{"role": "user", "content": "hi"}], field: n}).to_string(),
            &[],
        );
        assert_eq!(status, 400, "{v}");
        assert_eq!(
            v["error"]["message"],
            format!(
                "'{field}' {n} exceeds this server's cap of 2000 tokens per answer (flag serve --max-tokens-cap)"
            )
        );
    }
    // The server still answers.
    let (status, v) = post(&chat, &short, &[]);
    assert_eq!(status, 200, "{v}");
    assert_eq!(metric(&server, "flag_serve_chat_completions_total"), 1);

    // (d) A long request (greedy counting goes on for far more than 1,500 tokens) ...
    let long = json!({
        "messages": [{"role": "user", "content": "Count from 1 to 2000, separated by commas."},
                     {"role": "assistant", "content": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"}],
        "max_tokens": 1500, "temperature": 0,
    })
    .to_string()
    .into_bytes();
    let (s, writer) = raw_post(&addr, "/v1/chat/completions", long);
    writer.join().unwrap();
    wait_for_metric(&server, "flag_serve_sequences_decoding", 1);
    // ... holds the only admission slot (--max-pending 1): another model request is 503.
    let mut resp = agent()
        .post(&chat)
        .header("Content-Type", "application/json")
        .send(&short)
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(
        resp.headers()
            .get("Retry-After")
            .map(|h| h.to_str().unwrap()),
        Some("1")
    );
    let v: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.starts_with("the server is busy: 1 requests"), "{msg}");
    assert_eq!(metric(&server, "flag_serve_rejected_busy_total"), 1);

    // The client goes away: its sequence is dropped from the batch while being decoded ...
    drop(s);
    wait_for_metric(&server, "flag_serve_sequences_cancelled_total", 1);
    assert_eq!(metric(&server, "flag_serve_clients_gone_total"), 1);
    // ... so the next request is decoded and answered.
    let (status, v) = post(&chat, &short, &[]);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 2, "{v}");
    assert_eq!(metric(&server, "flag_serve_chat_completions_total"), 2);
    assert_eq!(metric(&server, "flag_serve_sequences_cancelled_total"), 1);
    assert_eq!(metric(&server, "flag_serve_requests_in_flight"), 0);
    let log = server.log();
    assert!(
        log.contains("dropped 1 sequence(s) whose client went away (while decoding)"),
        "{log}"
    );
    assert!(
        log.contains("POST /v1/chat/completions -> client went away"),
        "{log}"
    );
    assert!(log.contains("POST /v1/chat/completions -> 413"), "{log}");
}

/// Writes `bytes` on a new connection to `addr` from another thread (the server may answer
/// and close before it has them all) and returns the connection.
fn raw_request(addr: &str, bytes: Vec<u8>) -> (std::net::TcpStream, std::thread::JoinHandle<()>) {
    use std::io::Write;
    let s = std::net::TcpStream::connect(addr).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(300))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&bytes);
    });
    (s, writer)
}

/// Whether the server closes `s` (end of stream or reset) within `within`, bytes it sends
/// first being read and dropped.
fn closed_within(s: &std::net::TcpStream, within: Duration) -> bool {
    use std::io::Read;
    let deadline = std::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    while std::time::Instant::now() < deadline {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        match (&mut &*s).read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Issue 15 (hostile re-run): two framing headers are refused (request smuggling), a huge
/// head gets its 431, idle connections give their slot to a new client, a head trickled
/// byte by byte is cut off, and an abandoned embeddings request stops.
#[test]
fn serve_refuses_ambiguous_framing_and_frees_slots_and_abandoned_embeddings() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(tmp.path(), &[], &["--http-threads", "3"]);
    let addr = host_port(&server);
    let models = format!("{}/models", server.url);

    // (a) Two Content-Length or two Transfer-Encoding headers: 400, naming both.
    for (headers, want) in [
        (
            "Content-Length: 2\r\nContent-Length: 40\r\n",
            "2 Content-Length headers (2 / 40)",
        ),
        (
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
            "2 Transfer-Encoding headers (chunked / identity)",
        ),
    ] {
        let req = format!(
            "POST /v1/embeddings HTTP/1.1\r\nHost: {addr}\r\n{headers}\r\n{{}}\r\n0\r\n\r\n"
        );
        let (mut s, writer) = raw_request(&addr, req.into_bytes());
        let (status, head, body) = read_response(&mut s);
        writer.join().unwrap();
        assert_eq!(status, 400, "{head}{body}");
        assert!(body.contains(want), "{body}");
        assert!(head.contains("Connection: close"), "{head}");
    }

    // (b) A 20 MB request head: 431 reaches the client (the server reads what it still
    // sends before closing, so the answer is not lost to a reset).
    let mut big = format!("GET /v1/models HTTP/1.1\r\nHost: {addr}\r\nX-Big: ").into_bytes();
    big.resize(big.len() + 20_000_000, b'a');
    big.extend_from_slice(b"\r\n\r\n");
    let (mut s, writer) = raw_request(&addr, big);
    let (status, head, body) = read_response(&mut s);
    writer.join().unwrap();
    assert_eq!(status, 431, "{head}{body}");
    drop(s);

    // (c) Three connections (all of --http-threads 3) open and silent: a new client is
    // still served, one of them giving up its slot.
    let idle: Vec<std::net::TcpStream> = (0..3)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut resp = agent()
        .get(&models)
        .header("Connection", "close")
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let _ = resp.body_mut().read_to_string();
    let reclaimed = idle
        .iter()
        .filter(|s| closed_within(s, Duration::from_millis(500)))
        .count();
    assert!(reclaimed >= 1, "no idle connection gave up its slot");
    drop(idle);

    // (d) A head trickled a byte at a time never completes: the server closes it.
    let slow = std::net::TcpStream::connect(&addr).unwrap();
    let mut w = slow.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        use std::io::Write;
        let _ = w.write_all(b"GET /v1/models HTTP/1.1\r\nX-Slow: ");
        for _ in 0..120 {
            if w.write_all(b"a").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    });
    assert!(
        closed_within(&slow, Duration::from_secs(25)),
        "a trickled head kept its connection for 25 s"
    );
    trickle.join().unwrap();

    // (e) An embeddings request of 2,048 long texts (minutes of work on one thread), its
    // client gone once it is admitted: the embedder stops within a batch of texts ...
    let long_texts: Vec<String> = (0..2048)
        .map(|i| format!("item {i}: {}", "the market moved on news ".repeat(60)))
        .collect();
    let body = json!({"input": long_texts}).to_string().into_bytes();
    let (s, writer) = raw_post(&addr, "/v1/embeddings", body);
    writer.join().unwrap();
    wait_for_metric(&server, "flag_serve_requests_in_flight", 1);
    std::thread::sleep(Duration::from_millis(500));
    drop(s);
    wait_for_metric(&server, "flag_serve_embeddings_cancelled_total", 1);
    assert_eq!(metric(&server, "flag_serve_clients_gone_total"), 1);
    // ... so the next one is answered.
    let (status, v) = post(
        &format!("{}/embeddings", server.url),
        &json!({"input": ["a short text"]}).to_string(),
        &[],
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 384);
    assert_eq!(metric(&server, "flag_serve_embeddings_total"), 1);
    let log = server.log();
    assert!(
        log.contains("stopped an embeddings request of 2048 text(s) whose client went away"),
        "{log}"
    );
    assert!(
        log.contains("POST /v1/embeddings -> client went away"),
        "{log}"
    );
}
