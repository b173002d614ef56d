//! The references of `torud-bench forward --peer DIR`: the peer users would pick instead
//! (HashiCorp go-plugin's gRPC KV host and plugin, `kv-bench` and `kv-plugin`, built from
//! DIR) and a bare Unix-socket round trip, the one hop the target allows the daemon.
//!
//! The peer is built once into a temporary folder, then run one round at a time between
//! torud's rounds, so both see the same machine. Its host measures its own figures and
//! writes them as JSON (DIR's README says what each one means); this module only reads them.
//! It knows nothing of torud.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;

use crate::BenchResult;

/// The go-plugin peer, built and ready to run.
pub(crate) struct Peer {
    bin: tempfile::TempDir,
}

/// One run of the peer's host: its sequential Get latency and its throughput.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerRound {
    /// Median Get latency, µs.
    pub(crate) p50_us: f64,
    /// 99th percentile Get latency, µs.
    pub(crate) p99_us: f64,
    /// Gets per second with the given calls in flight.
    pub(crate) calls_per_s: f64,
}

/// What one round of the peer measures.
pub(crate) struct PeerLoad {
    /// Sequential Gets timed.
    pub(crate) calls: usize,
    /// Seconds of the throughput run.
    pub(crate) seconds: f64,
    /// Goroutines calling at once in the throughput run.
    pub(crate) in_flight: usize,
    /// Bytes of the value stored under the benchmark key.
    pub(crate) value_size: usize,
}

impl Peer {
    /// Builds `kv-plugin` and `kv-bench` from `src` (the peer's Go module) with `go build`,
    /// as its `run.sh` does.
    pub(crate) async fn build(src: &Path) -> BenchResult<Peer> {
        let bin = tempfile::tempdir()?;
        for (package, name) in [("./plugin", "kv-plugin"), ("./bench", "kv-bench")] {
            let status = Command::new(go_tool())
                .args(["build", "-o"])
                .arg(bin.path().join(name))
                .arg(package)
                .current_dir(src)
                .stdout(Stdio::null())
                .status()
                .await
                .map_err(|e| format!("cannot run `go` (set GO to the go tool's path): {e}"))?;
            if !status.success() {
                return Err(format!(
                    "`go build {package}` in {} failed ({status}); is DIR the go-plugin peer?",
                    src.display()
                )
                .into());
            }
        }
        Ok(Peer { bin })
    }

    /// Runs the peer's host once (launching its plugin once) and reads its figures.
    pub(crate) async fn round(&self, load: &PeerLoad) -> BenchResult<PeerRound> {
        let out = self.bin.path().join("round.json");
        let status = Command::new(self.bin.path().join("kv-bench"))
            .arg("--plugin")
            .arg(self.bin.path().join("kv-plugin"))
            .arg(format!("--calls={}", load.calls))
            .arg(format!("--warmup={}", load.calls.clamp(1, 500)))
            .arg(format!("--conc={}", load.in_flight))
            .arg(format!("--seconds={}", load.seconds))
            .arg("--rounds=1")
            .arg("--launches=1")
            .arg(format!("--value-size={}", load.value_size))
            .arg("--json")
            .arg(&out)
            .stdout(Stdio::null())
            .status()
            .await?;
        if !status.success() {
            return Err(format!("the peer's kv-bench failed ({status})").into());
        }
        let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&out)?)?;
        let field = |key: &str| {
            doc.get(key)
                .and_then(serde_json::Value::as_f64)
                .ok_or_else(|| format!("the peer's JSON has no number {key:?}"))
        };
        Ok(PeerRound {
            p50_us: field("get_p50_us")?,
            p99_us: field("get_p99_us")?,
            calls_per_s: field("throughput_per_s")?,
        })
    }
}

/// The go tool: `$GO`, else `go` on the `PATH`, else Go's default install location.
fn go_tool() -> PathBuf {
    if let Some(go) = std::env::var_os("GO") {
        return go.into();
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("go"))
            .find(|go| go.is_file())
    });
    on_path.unwrap_or_else(|| "/usr/local/go/bin/go".into())
}

/// Untimed round trips before the timed ones.
const UDS_WARM_UP: usize = 200;

/// Round trips of `size`-byte messages over a Unix socket pair, one thread echoing with
/// blocking reads and writes: the cost of one socket round trip with nothing around it.
/// Runs on blocking threads, off the runtime.
pub(crate) async fn uds_round_trips(size: usize, count: usize) -> BenchResult<Vec<Duration>> {
    let timed = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<Duration>> {
        let (mut near, mut far) = UnixStream::pair()?;
        let echo = std::thread::spawn(move || -> std::io::Result<()> {
            let mut buf = vec![0u8; size];
            loop {
                match far.read_exact(&mut buf) {
                    Ok(()) => far.write_all(&buf)?,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        });
        let message = vec![b'x'; size];
        let mut answer = vec![0u8; size];
        let mut samples = Vec::with_capacity(count);
        for i in 0..count + UDS_WARM_UP {
            let began = Instant::now();
            near.write_all(&message)?;
            near.read_exact(&mut answer)?;
            if i >= UDS_WARM_UP {
                samples.push(began.elapsed());
            }
        }
        drop(near);
        echo.join().expect("the echo thread panicked")?;
        Ok(samples)
    });
    Ok(timed.await??)
}
