//! The environment that tunes candle's CPU thread pools in a rank process.
//!
//! A rank's CPU work runs on two pools: rayon's (matrix products, through `gemm`, and our
//! own kernels) and candle's barrier pool (element-wise ops). Both are sized from
//! `RAYON_NUM_THREADS`, so with `n` threads on `n` cores they oversubscribe the cores. After
//! each element-wise op candle's workers spin for `CANDLE_BARRIER_POOL_SPIN_LIMIT`
//! iterations (25,000 by default) before they sleep, and on a busy core that spin takes the
//! time the next matrix product's rayon threads need. Measured on 2 cores at 2 threads
//! (`steps` bench, GM-DGM step): 42 ms with candle's default, 34–37 ms with a limit of
//! 2,000–4,000, 41 ms with one element-wise thread (`CANDLE_NUM_THREADS=1`). One thread
//! has no barrier workers, so the limit changes nothing there.

/// The variable candle reads, once, when it starts its barrier pool.
pub const SPIN_LIMIT_ENV: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// Our default spin limit (candle's is 25,000).
pub const DEFAULT_SPIN_LIMIT: u32 = 3000;

/// Variables to set in a rank process's environment: our defaults for those the current
/// process does not set itself (a value the operator set wins).
pub fn pool_env() -> Vec<(&'static str, String)> {
    defaults_unless_set(std::env::var_os(SPIN_LIMIT_ENV).is_some())
}

/// [`pool_env`] given whether the operator set the spin limit.
fn defaults_unless_set(spin_limit_set: bool) -> Vec<(&'static str, String)> {
    if spin_limit_set {
        return Vec::new();
    }
    vec![(SPIN_LIMIT_ENV, DEFAULT_SPIN_LIMIT.to_string())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_the_spin_limit_unless_the_operator_did() {
        assert_eq!(
            defaults_unless_set(false),
            vec![("CANDLE_BARRIER_POOL_SPIN_LIMIT", "3000".to_string())]
        );
        assert!(defaults_unless_set(true).is_empty());
    }
}
