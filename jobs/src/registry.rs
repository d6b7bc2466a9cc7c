//! The registry of every job this build knows, by name.

use std::sync::OnceLock;

use crate::job::Job;

/// All jobs, looked up by their registry name.
pub struct Registry {
    jobs: Vec<Box<dyn Job>>,
}

impl Registry {
    fn new() -> Self {
        Self {
            jobs: vec![
                Box::new(crate::neural_ode::NeuralOdeJob::new()),
                Box::new(crate::db_vae::DbVaeJob::new()),
                Box::new(crate::gm_dgm::GmDgmJob::new()),
            ],
        }
    }

    /// The job called `name`.
    pub fn get(&self, name: &str) -> Option<&dyn Job> {
        self.jobs
            .iter()
            .find(|j| j.name() == name)
            .map(|j| j.as_ref())
    }

    /// Every job's name, in registry order.
    pub fn names(&self) -> Vec<&'static str> {
        self.jobs.iter().map(|j| j.name()).collect()
    }

    /// Every job, in registry order.
    pub fn iter(&self) -> impl Iterator<Item = &dyn Job> {
        self.jobs.iter().map(|j| j.as_ref())
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("jobs", &self.names())
            .finish()
    }
}

/// The process-wide job registry.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn knows_neural_ode() {
        let r = registry();
        assert_eq!(r.names(), vec!["neural-ode", "db-vae", "gm-dgm"]);
        let job = r.get("neural-ode").unwrap();
        assert_eq!(job.name(), "neural-ode");
        assert!(!job.description().is_empty());
        assert!(r.get("nope").is_none());
        assert_eq!(r.iter().count(), 3);
        assert_eq!(r.get("db-vae").unwrap().name(), "db-vae");
        assert_eq!(r.get("gm-dgm").unwrap().name(), "gm-dgm");
        let schema = job.schema();
        assert_eq!(schema.default_preset(), "quick");
        assert!(schema.presets().contains(&"paper"));
        // every preset of every job resolves with no overrides
        for job in r.iter() {
            for preset in job.schema().presets() {
                job.resolve_config(preset, &BTreeMap::new()).unwrap();
            }
        }
    }
}
