//! iperf3 as a client inside a namespace, for the tests and benches that measure throughput
//! through the tunnel.

use serde_json::Value;

use crate::NetNs;

/// Mbit/s of one iperf3 client run from `ns` (`args` are iperf3's, `-J` is added), as the
/// receiver counted it. iperf3's server takes a moment to tear a test down, and a client that
/// comes in meanwhile is told the server is busy or has its control connection reset before
/// any data flows. Such a run is no measurement: it is tried again after a second, up to
/// `tries` runs in all. A run that measured is never retried; any other failure is an error.
pub fn iperf3_mbits(ns: &NetNs, args: &[&str], tries: u32) -> Result<f64, String> {
    let mut run = 0;
    loop {
        run += 1;
        let out = ns
            .command("iperf3")
            .args(args)
            .arg("-J")
            .output()
            .map_err(|e| format!("iperf3: {e}"))?;
        let report: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "iperf3 output: {e}\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        if let Some(bps) = report["end"]["sum_received"]["bits_per_second"].as_f64() {
            return Ok(bps / 1e6);
        }
        let server_winding_down = report["intervals"].as_array().is_some_and(Vec::is_empty)
            && report["error"]
                .as_str()
                .is_some_and(|e| e.contains("control") || e.contains("busy"));
        if !server_winding_down || run >= tries {
            return Err(format!("no receiver rate (run {run}) in {report}"));
        }
        eprintln!("iperf3 run {run}: {}; again", report["error"]);
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
