//! flatshard-bench prints the rows of torch_baseline.py's format (smoke run).

use std::process::Command;

#[test]
fn prints_baseline_format_rows() {
    let o = Command::new(env!("CARGO_BIN_EXE_flatshard-bench"))
        .args(["--world", "3", "--sizes", "4K,100000", "--iters", "2", "--transport", "tcp"])
        .args(["--ops", "all_reduce,all_gather,reduce_scatter,broadcast,fsdp_unshard,average_parameters"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<&str> = out.lines().collect();
    assert_eq!(rows.len(), 12, "{out}");
    let mut i = 0;
    for op in ["all_reduce", "all_gather", "reduce_scatter", "broadcast", "fsdp_unshard", "average_parameters"] {
        for bytes in [4096, 100000] {
            let row = rows[i];
            i += 1;
            let head = format!(r#"{{"impl": "flatshard-tcp", "op": "{op}", "world": 3, "bytes": {bytes}, "dtype": "f32", "#);
            assert!(row.starts_with(&head), "{row}\nexpected to start with {head}");
            for key in ["median_s", "algbw_GBps", "busbw_GBps", "peak_rss_bytes"] {
                assert!(row.contains(&format!(r#""{key}": "#)), "{row} lacks {key}");
            }
            let field = |k: &str| -> f64 {
                let rest = &row[row.find(&format!(r#""{k}": "#)).unwrap() + k.len() + 4..];
                rest[..rest.find([',', '}']).unwrap()].parse().unwrap()
            };
            assert!(field("median_s") > 0.0, "{row}");
            let factor = match op {
                "all_reduce" | "average_parameters" => 4.0 / 3.0,
                "broadcast" => 1.0,
                _ => 2.0 / 3.0,
            };
            let (alg, bus) = (field("algbw_GBps"), field("busbw_GBps"));
            assert!((bus - alg * factor).abs() <= 0.002 + 0.01 * bus, "{row}: busbw vs algbw x {factor}");
            assert!(field("peak_rss_bytes") > 1e6, "{row}");
        }
    }
}

/// `--ops train_step` (API §7 overlap benchmark) prints one row with the step
/// figures, on shm and TCP (small shapes: a smoke run, not a measurement).
#[test]
fn train_step_prints_its_row() {
    for t in ["shm", "tcp"] {
        let o = Command::new(env!("CARGO_BIN_EXE_flatshard-bench"))
            .args(["--ops", "train_step", "--world", "2", "--layers", "3", "--layer-bytes", "64K", "--iters", "1", "--compute-ms", "1", "--transport", t])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
        let row = out.lines().next().unwrap_or("");
        assert!(row.starts_with(&format!(r#"{{"impl": "flatshard-{t}", "op": "train_step", "world": 2, "bytes": 196608, "#)), "{row}");
        for key in [
            "compute_nominal_s",
            "compute_s",
            "comm_s",
            "blocking_step_s",
            "async_step_s",
            "overlap_efficiency",
            "async_over_blocking",
            "all_reduce_4K_s_with_progress_thread",
        ] {
            assert!(row.contains(&format!(r#""{key}": "#)), "{row} lacks {key}");
        }
        assert!(row.contains(r#""compute_nominal_s": 0.009000"#), "3 layers x 3 x 1 ms: {row}");
        // compute_s is the sleeps timed: at least what they asked for
        let compute: f64 = row.split(r#""compute_s": "#).nth(1).and_then(|r| r.split(',').next()).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        assert!((0.009..0.5).contains(&compute), "compute_s {compute}: {row}");
    }
}
