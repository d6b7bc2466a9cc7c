//! `trainyard reproduce --seeds`: the seed list, and each claim summarised over the seeds
//! (mean ± std of our numbers, and on how many seeds it held).

use serde_json::{json, Value};

use super::Row;
use crate::error::bad_input;

/// The most seeds one `--seeds` may ask for (each is a whole run of every job).
const MAX_SEEDS: usize = 100;

/// The seeds of `--seeds`: comma-separated seeds (`0,1,2`) and inclusive ranges (`0-4`),
/// in the order given, without repeats.
pub fn parse_seeds(list: &str) -> anyhow::Result<Vec<u64>> {
    let bad = |why: String| bad_input(format!("--seeds {list:?}: {why}"));
    let mut seeds: Vec<u64> = Vec::new();
    for part in list.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(bad("an empty item (write e.g. 0,1,2 or 0-4)".into()));
        }
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let num = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| bad(format!("{s:?} is not a non-negative integer")))
        };
        let (lo, hi) = (num(lo)?, num(hi)?);
        if lo > hi {
            return Err(bad(format!("the range {part} runs backwards")));
        }
        if hi - lo >= MAX_SEEDS as u64 {
            return Err(bad(format!("more than {MAX_SEEDS} seeds")));
        }
        for s in lo..=hi {
            if !seeds.contains(&s) {
                seeds.push(s);
            }
        }
        if seeds.len() > MAX_SEEDS {
            return Err(bad(format!("more than {MAX_SEEDS} seeds")));
        }
    }
    Ok(seeds)
}

/// One claim of one job over every seed it ran with.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The job's label (`neural-ode cnf`, `gm-dgm`).
    pub job: String,
    /// Experiment within the job.
    pub experiment: String,
    /// The claim in words.
    pub claim: String,
    /// The paper's number(s).
    pub paper: String,
    /// Unit of the values.
    pub unit: String,
    /// Each seed's run: its seed, job id, whether it succeeded and held, and our numbers.
    pub runs: Vec<SeedRun>,
}

/// One seed's run of a claim.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedRun {
    /// The seed.
    pub seed: Option<u64>,
    /// The job that ran it.
    pub job_id: String,
    /// Whether the job succeeded.
    pub succeeded: bool,
    /// Whether the claim held (false when the job failed).
    pub held: bool,
    /// Our treatment's number.
    pub treatment: Option<f64>,
    /// Our baseline's number.
    pub baseline: Option<f64>,
}

impl Summary {
    /// How many runs held the claim, of how many.
    pub fn held(&self) -> (usize, usize) {
        (
            self.runs.iter().filter(|r| r.succeeded && r.held).count(),
            self.runs.len(),
        )
    }

    /// `mean ± std (v1, v2, …)` of the treatment's numbers.
    pub fn treatment(&self) -> String {
        spread(self.runs.iter().map(|r| r.treatment), &self.unit)
    }

    /// `mean ± std (v1, v2, …)` of the baseline's numbers.
    pub fn baseline(&self) -> String {
        spread(self.runs.iter().map(|r| r.baseline), &self.unit)
    }

    /// The summary as JSON (for `-o json|yaml`).
    pub fn to_json(&self) -> Value {
        let (held, runs) = self.held();
        let stats = |f: fn(&SeedRun) -> Option<f64>| {
            let v: Vec<f64> = self.runs.iter().filter_map(f).collect();
            match mean_std(&v) {
                Some((m, s)) if v.len() == self.runs.len() => json!({"mean": m, "std": s}),
                _ => Value::Null,
            }
        };
        json!({
            "job": self.job,
            "experiment": self.experiment,
            "claim": self.claim,
            "paper": self.paper,
            "unit": self.unit,
            "held": held,
            "runs": runs,
            "treatment": stats(|r| r.treatment),
            "baseline": stats(|r| r.baseline),
            "per_seed": self.runs.iter().map(|r| json!({
                "seed": r.seed,
                "job_id": r.job_id,
                "succeeded": r.succeeded,
                "held": r.succeeded && r.held,
                "treatment": r.treatment,
                "baseline": r.baseline,
            })).collect::<Vec<_>>(),
        })
    }
}

/// The rows of every seed grouped into one summary per (job, experiment, claim), in the
/// order the claims first appear.
pub fn summarise(rows: &[Row]) -> Vec<Summary> {
    let mut out: Vec<Summary> = Vec::new();
    for r in rows {
        let run = SeedRun {
            seed: r.seed,
            job_id: r.job_id.clone(),
            succeeded: r.state == "SUCCEEDED",
            held: r.checked && r.claim.held,
            treatment: r.claim.treatment_value,
            baseline: r.claim.baseline_value,
        };
        let found = out.iter_mut().find(|s| {
            s.job == r.job && s.experiment == r.claim.experiment && s.claim == r.claim.claim
        });
        match found {
            Some(s) => s.runs.push(run),
            None => out.push(Summary {
                job: r.job.clone(),
                experiment: r.claim.experiment.clone(),
                claim: r.claim.claim.clone(),
                paper: r.claim.paper.clone(),
                unit: r.claim.unit.clone(),
                runs: vec![run],
            }),
        }
    }
    out
}

/// Mean and sample standard deviation (0 for one value); `None` for no values.
pub fn mean_std(v: &[f64]) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    Some((mean, var.sqrt()))
}

/// `mean ± std unit (v1, v2, …)` of the runs' numbers; `-` when a run has none.
fn spread(values: impl Iterator<Item = Option<f64>>, unit: &str) -> String {
    let values: Option<Vec<f64>> = values.collect();
    let Some(v) = values.filter(|v| !v.is_empty()) else {
        return "-".into();
    };
    let Some((mean, std)) = mean_std(&v) else {
        return "-".into();
    };
    let digits = decimals(mean);
    let each: Vec<String> = v.iter().map(|x| format!("{x:.digits$}")).collect();
    let unit = if unit.is_empty() {
        String::new()
    } else {
        format!(" {unit}")
    };
    format!(
        "{mean:.digits$} ± {std:.digits$}{unit} ({})",
        each.join(", ")
    )
}

/// Decimals that show a number of this size to about four significant digits.
fn decimals(x: f64) -> usize {
    match x.abs() {
        a if a >= 100.0 => 1,
        a if a >= 10.0 => 2,
        a if a >= 1.0 => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_proto::Claim;

    #[test]
    fn seed_lists_take_items_and_ranges() {
        assert_eq!(parse_seeds("0,1,2").unwrap(), vec![0, 1, 2]);
        assert_eq!(parse_seeds("3-5, 0,4").unwrap(), vec![3, 4, 5, 0]);
        assert_eq!(parse_seeds("7").unwrap(), vec![7]);
        for bad in ["", "1,,2", "a", "-1", "5-3", "0-1000", "1.5"] {
            let err = parse_seeds(bad).unwrap_err().to_string();
            assert!(err.starts_with("--seeds"), "{bad}: {err}");
        }
    }

    fn row(seed: u64, state: &str, held: bool, t: f64, b: Option<f64>) -> Row {
        Row {
            job: "gm-dgm".into(),
            seed: Some(seed),
            job_id: format!("job-{seed}"),
            state: state.into(),
            checked: true,
            claim: Claim {
                claim: "GM-DGM >= 60%".into(),
                paper: "77.2%".into(),
                held,
                treatment_value: Some(t),
                baseline_value: b,
                unit: "%".into(),
                ..Default::default()
            },
        }
    }

    #[test]
    fn claims_are_summarised_over_seeds() {
        let rows = vec![
            row(0, "SUCCEEDED", true, 60.0, Some(50.0)),
            row(1, "SUCCEEDED", false, 57.0, Some(52.0)),
            row(2, "FAILED", true, 63.0, None),
        ];
        let s = summarise(&rows);
        assert_eq!(s.len(), 1);
        // a failed run never counts as held
        assert_eq!(s[0].held(), (1, 3));
        assert_eq!(s[0].treatment(), "60.00 ± 3.00 % (60.00, 57.00, 63.00)");
        // a run without a baseline number leaves the baseline unsummarised
        assert_eq!(s[0].baseline(), "-");
        let j = s[0].to_json();
        assert_eq!(j["held"], 1);
        assert_eq!(j["treatment"]["mean"], 60.0);
        assert!(j["baseline"].is_null());
        assert_eq!(j["per_seed"][2]["held"], false);
    }

    #[test]
    fn mean_and_sample_std() {
        assert_eq!(mean_std(&[]), None);
        assert_eq!(mean_std(&[2.0]), Some((2.0, 0.0)));
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!((m - 2.5).abs() < 1e-12 && (s - 1.290_994_448_7).abs() < 1e-9);
    }
}
