//! Typed job configuration: a [`ConfigSchema`] of keys (type, range, help, a default per
//! preset) and the [`ResolvedConfig`] that comes out of resolving a preset plus `--set`
//! overrides against it.
//!
//! Every error names the key (or preset) it is about, so the coordinator and the CLI can
//! report `spec.config.lr: ...` without knowing anything about the job.

use std::collections::BTreeMap;
use std::fmt;

/// Errors from resolving or reading a config.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The preset is not one of the schema's presets.
    #[error("unknown preset \"{preset}\" (known: {})", known.join(", "))]
    UnknownPreset {
        /// The preset asked for.
        preset: String,
        /// The presets the schema knows.
        known: Vec<String>,
    },
    /// The key is not in the schema.
    #[error("unknown config key \"{key}\" (known: {})", known.join(", "))]
    UnknownKey {
        /// The key asked for.
        key: String,
        /// The keys the schema knows.
        known: Vec<String>,
    },
    /// The value does not parse as the key's type, or is out of range.
    #[error("{key}: invalid value \"{value}\": {reason}")]
    InvalidValue {
        /// The key the value was given for.
        key: String,
        /// The value as given.
        value: String,
        /// Why it was rejected.
        reason: String,
    },
}

/// The type (and range) of a config key.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigKind {
    /// A signed integer in `min..=max`.
    Int {
        /// Smallest allowed value.
        min: i64,
        /// Largest allowed value.
        max: i64,
    },
    /// A finite float in `min..=max`.
    Float {
        /// Smallest allowed value.
        min: f64,
        /// Largest allowed value.
        max: f64,
    },
    /// `true`/`false` (also accepts `1`/`0`, `yes`/`no`, `on`/`off`).
    Bool,
    /// Any string.
    Str,
    /// One of a fixed set of strings.
    Choice(&'static [&'static str]),
}

impl fmt::Display for ConfigKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigKind::Int { min, max } => write!(f, "int [{min}, {max}]"),
            ConfigKind::Float { min, max } => write!(f, "float [{min}, {max}]"),
            ConfigKind::Bool => write!(f, "bool"),
            ConfigKind::Str => write!(f, "string"),
            ConfigKind::Choice(options) => write!(f, "one of {}", options.join("|")),
        }
    }
}

/// A typed config value.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigValue {
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A string (also the value of a choice key).
    Str(String),
}

impl fmt::Display for ConfigValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigValue::Int(v) => write!(f, "{v}"),
            ConfigValue::Float(v) => write!(f, "{v}"),
            ConfigValue::Bool(v) => write!(f, "{v}"),
            ConfigValue::Str(v) => write!(f, "{v}"),
        }
    }
}

impl ConfigValue {
    fn to_json(&self) -> serde_json::Value {
        match self {
            ConfigValue::Int(v) => serde_json::Value::from(*v),
            ConfigValue::Float(v) => serde_json::Value::from(*v),
            ConfigValue::Bool(v) => serde_json::Value::from(*v),
            ConfigValue::Str(v) => serde_json::Value::from(v.clone()),
        }
    }
}

/// One config key: name, type, help text, and its default (with per-preset overrides).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigKey {
    /// Key name, as used in `--set name=value`.
    pub name: &'static str,
    /// Type and range.
    pub kind: ConfigKind,
    /// One-line help text.
    pub help: &'static str,
    /// Default for presets that do not set their own.
    pub default: String,
    /// Per-preset defaults, by preset name.
    pub preset_defaults: BTreeMap<&'static str, String>,
}

impl ConfigKey {
    /// A key with a type, help text and a default for every preset.
    pub fn new(
        name: &'static str,
        kind: ConfigKind,
        help: &'static str,
        default: impl ToString,
    ) -> Self {
        Self {
            name,
            kind,
            help,
            default: default.to_string(),
            preset_defaults: BTreeMap::new(),
        }
    }

    /// An integer key in `min..=max`.
    pub fn int(name: &'static str, min: i64, max: i64, default: i64, help: &'static str) -> Self {
        Self::new(name, ConfigKind::Int { min, max }, help, default)
    }

    /// A float key in `min..=max`.
    pub fn float(name: &'static str, min: f64, max: f64, default: f64, help: &'static str) -> Self {
        Self::new(name, ConfigKind::Float { min, max }, help, default)
    }

    /// A boolean key.
    pub fn bool(name: &'static str, default: bool, help: &'static str) -> Self {
        Self::new(name, ConfigKind::Bool, help, default)
    }

    /// A free string key.
    pub fn str(name: &'static str, default: &str, help: &'static str) -> Self {
        Self::new(name, ConfigKind::Str, help, default)
    }

    /// A choice key; `default` should be one of `options` (checked by [`ConfigSchema::new`]).
    pub fn choice(
        name: &'static str,
        options: &'static [&'static str],
        default: &str,
        help: &'static str,
    ) -> Self {
        Self::new(name, ConfigKind::Choice(options), help, default)
    }

    /// Sets this key's default for one preset.
    pub fn preset(mut self, preset: &'static str, value: impl ToString) -> Self {
        self.preset_defaults.insert(preset, value.to_string());
        self
    }

    /// The default value (unparsed) this key has under `preset`.
    pub fn default_for(&self, preset: &str) -> &str {
        self.preset_defaults
            .get(preset)
            .map(String::as_str)
            .unwrap_or(&self.default)
    }

    /// Parses and range-checks `value` for this key.
    pub fn parse(&self, value: &str) -> Result<ConfigValue, ConfigError> {
        let invalid = |reason: String| ConfigError::InvalidValue {
            key: self.name.to_string(),
            value: value.to_string(),
            reason,
        };
        let trimmed = value.trim();
        match &self.kind {
            ConfigKind::Int { min, max } => {
                let v: i64 = trimmed
                    .parse()
                    .map_err(|_| invalid("expected an integer".to_string()))?;
                if v < *min || v > *max {
                    return Err(invalid(format!("out of range [{min}, {max}]")));
                }
                Ok(ConfigValue::Int(v))
            }
            ConfigKind::Float { min, max } => {
                let v: f64 = trimmed
                    .parse()
                    .map_err(|_| invalid("expected a number".to_string()))?;
                if !v.is_finite() {
                    return Err(invalid("expected a finite number".to_string()));
                }
                if v < *min || v > *max {
                    return Err(invalid(format!("out of range [{min}, {max}]")));
                }
                Ok(ConfigValue::Float(v))
            }
            ConfigKind::Bool => match trimmed.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(ConfigValue::Bool(true)),
                "false" | "0" | "no" | "off" => Ok(ConfigValue::Bool(false)),
                _ => Err(invalid("expected true or false".to_string())),
            },
            ConfigKind::Str => Ok(ConfigValue::Str(value.to_string())),
            ConfigKind::Choice(options) => {
                if options.contains(&trimmed) {
                    Ok(ConfigValue::Str(trimmed.to_string()))
                } else {
                    Err(invalid(format!("expected one of {}", options.join(", "))))
                }
            }
        }
    }
}

/// Error building a schema (a programming error in a job's definition).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchemaError {
    /// The schema has no presets.
    #[error("a schema needs at least one preset")]
    NoPresets,
    /// Two keys share a name.
    #[error("duplicate config key \"{0}\"")]
    DuplicateKey(String),
    /// A key sets a default for a preset the schema does not have.
    #[error("key \"{key}\" sets a default for unknown preset \"{preset}\"")]
    UnknownPreset {
        /// The key.
        key: String,
        /// The preset it names.
        preset: String,
    },
    /// A default does not pass the key's own validation.
    #[error("bad default: {0}")]
    BadDefault(ConfigError),
}

/// The keys every training job has for checkpoints and logs: `checkpoint_every` (default
/// 200 steps) and `log_every` (default `log_every` steps).
pub fn checkpoint_keys(log_every: i64) -> [ConfigKey; 2] {
    [
        ConfigKey::int(
            "checkpoint_every",
            0,
            1_000_000,
            200,
            "save a checkpoint every N steps (0: only at model boundaries)",
        ),
        ConfigKey::int(
            "log_every",
            1,
            1_000_000,
            log_every,
            "log a training line every N steps",
        ),
    ]
}

/// Checks that data set key `key` is `builtin` (a data set embedded in the binary) or a
/// data set URL (`file://`, `s3://`, `gs://`, `az://`).
pub fn check_dataset(config: &ResolvedConfig, key: &str, builtin: &str) -> Result<(), ConfigError> {
    let value = config.get_str(key)?;
    let url_ok = ["file://", "s3://", "gs://", "az://"]
        .iter()
        .any(|scheme| value.len() > scheme.len() && value.starts_with(scheme));
    if value != builtin && !url_ok {
        return Err(ConfigError::InvalidValue {
            key: key.into(),
            value: value.to_string(),
            reason: format!(
                "expected {builtin} or a data set URL (file:///abs/path, s3://bucket/prefix, \
                 gs://..., az://...)"
            ),
        });
    }
    Ok(())
}

/// A job's config schema: its presets (the first is the default) and its keys.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigSchema {
    presets: Vec<&'static str>,
    preset_help: BTreeMap<&'static str, &'static str>,
    keys: Vec<ConfigKey>,
}

impl ConfigSchema {
    /// Builds a schema from `(preset, help)` pairs (the first is the default preset) and
    /// keys. Checks that every default of every preset validates.
    pub fn new(
        presets: &[(&'static str, &'static str)],
        keys: Vec<ConfigKey>,
    ) -> Result<Self, SchemaError> {
        if presets.is_empty() {
            return Err(SchemaError::NoPresets);
        }
        let names: Vec<&'static str> = presets.iter().map(|(n, _)| *n).collect();
        let mut seen = std::collections::BTreeSet::new();
        for key in &keys {
            if !seen.insert(key.name) {
                return Err(SchemaError::DuplicateKey(key.name.to_string()));
            }
            for preset in key.preset_defaults.keys() {
                if !names.contains(preset) {
                    return Err(SchemaError::UnknownPreset {
                        key: key.name.to_string(),
                        preset: preset.to_string(),
                    });
                }
            }
            for preset in &names {
                key.parse(key.default_for(preset))
                    .map_err(SchemaError::BadDefault)?;
            }
        }
        Ok(Self {
            presets: names,
            preset_help: presets.iter().copied().collect(),
            keys,
        })
    }

    /// The schema of job `job`, built from fixed presets and keys (see
    /// [`ConfigSchema::new`]). Panics if they are invalid: a bug in the job's code, which
    /// the registry's tests catch.
    pub fn fixed(
        job: &str,
        presets: &[(&'static str, &'static str)],
        keys: Vec<ConfigKey>,
    ) -> Self {
        match Self::new(presets, keys) {
            Ok(schema) => schema,
            Err(e) => panic!("{job} schema is invalid: {e}"),
        }
    }

    /// Preset names; the first is the default.
    pub fn presets(&self) -> &[&'static str] {
        &self.presets
    }

    /// The preset used when none is given.
    pub fn default_preset(&self) -> &'static str {
        self.presets[0]
    }

    /// One-line description of a preset.
    pub fn preset_help(&self, preset: &str) -> Option<&'static str> {
        self.preset_help.get(preset).copied()
    }

    /// All keys, in declaration order.
    pub fn keys(&self) -> &[ConfigKey] {
        &self.keys
    }

    /// The key called `name`.
    pub fn key(&self, name: &str) -> Option<&ConfigKey> {
        self.keys.iter().find(|k| k.name == name)
    }

    /// Resolves `preset` (empty string = the default preset) plus string overrides into a
    /// typed, validated config.
    pub fn resolve(
        &self,
        preset: &str,
        overrides: &BTreeMap<String, String>,
    ) -> Result<ResolvedConfig, ConfigError> {
        let preset = if preset.is_empty() {
            self.default_preset()
        } else {
            preset
        };
        if !self.presets.contains(&preset) {
            return Err(ConfigError::UnknownPreset {
                preset: preset.to_string(),
                known: self.presets.iter().map(|p| p.to_string()).collect(),
            });
        }
        for key in overrides.keys() {
            if self.key(key).is_none() {
                return Err(ConfigError::UnknownKey {
                    key: key.clone(),
                    known: self.keys.iter().map(|k| k.name.to_string()).collect(),
                });
            }
        }
        let mut values = BTreeMap::new();
        for key in &self.keys {
            let raw = overrides
                .get(key.name)
                .map(String::as_str)
                .unwrap_or_else(|| key.default_for(preset));
            values.insert(key.name.to_string(), key.parse(raw)?);
        }
        Ok(ResolvedConfig {
            preset: preset.to_string(),
            values,
        })
    }
}

/// A validated config: the preset it came from and a typed value for every key.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedConfig {
    preset: String,
    values: BTreeMap<String, ConfigValue>,
}

impl ResolvedConfig {
    /// The preset this config was resolved from.
    pub fn preset(&self) -> &str {
        &self.preset
    }

    /// All values by key.
    pub fn values(&self) -> &BTreeMap<String, ConfigValue> {
        &self.values
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Result<&ConfigValue, ConfigError> {
        self.values.get(key).ok_or_else(|| ConfigError::UnknownKey {
            key: key.to_string(),
            known: self.values.keys().cloned().collect(),
        })
    }

    fn wrong_type(&self, key: &str, value: &ConfigValue, expected: &str) -> ConfigError {
        ConfigError::InvalidValue {
            key: key.to_string(),
            value: value.to_string(),
            reason: format!("expected {expected}"),
        }
    }

    /// An integer key as `i64`.
    pub fn get_i64(&self, key: &str) -> Result<i64, ConfigError> {
        match self.get(key)? {
            ConfigValue::Int(v) => Ok(*v),
            other => Err(self.wrong_type(key, other, "an integer")),
        }
    }

    /// A non-negative integer key as `u64`.
    pub fn get_u64(&self, key: &str) -> Result<u64, ConfigError> {
        let value = self.get(key)?;
        match value {
            ConfigValue::Int(v) if *v >= 0 => Ok(*v as u64),
            other => Err(self.wrong_type(key, other, "a non-negative integer")),
        }
    }

    /// A non-negative integer key as `usize`.
    pub fn get_usize(&self, key: &str) -> Result<usize, ConfigError> {
        let v = self.get_u64(key)?;
        usize::try_from(v).map_err(|_| ConfigError::InvalidValue {
            key: key.to_string(),
            value: v.to_string(),
            reason: "too large for this platform".to_string(),
        })
    }

    /// A float key (integer keys convert).
    pub fn get_f64(&self, key: &str) -> Result<f64, ConfigError> {
        match self.get(key)? {
            ConfigValue::Float(v) => Ok(*v),
            ConfigValue::Int(v) => Ok(*v as f64),
            other => Err(self.wrong_type(key, other, "a number")),
        }
    }

    /// A boolean key.
    pub fn get_bool(&self, key: &str) -> Result<bool, ConfigError> {
        match self.get(key)? {
            ConfigValue::Bool(v) => Ok(*v),
            other => Err(self.wrong_type(key, other, "a boolean")),
        }
    }

    /// A string or choice key.
    pub fn get_str(&self, key: &str) -> Result<&str, ConfigError> {
        match self.get(key)? {
            ConfigValue::Str(v) => Ok(v),
            other => Err(self.wrong_type(key, other, "a string")),
        }
    }

    /// Serialises as `{"preset": "...", "values": {"key": value, ...}}`.
    pub fn to_json(&self) -> String {
        self.to_json_value().to_string()
    }

    /// The same as [`ResolvedConfig::to_json`], as a JSON value.
    pub fn to_json_value(&self) -> serde_json::Value {
        let values: serde_json::Map<String, serde_json::Value> = self
            .values
            .iter()
            .map(|(k, v)| (k.clone(), v.to_json()))
            .collect();
        serde_json::json!({ "preset": self.preset, "values": values })
    }

    /// Parses the output of [`ResolvedConfig::to_json`]. Integers stay integers and
    /// numbers with a fraction or exponent become floats.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let bad = |key: &str, value: String, reason: &str| ConfigError::InvalidValue {
            key: key.to_string(),
            value,
            reason: reason.to_string(),
        };
        let root: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| bad("config", truncate(json), &format!("not JSON: {e}")))?;
        let preset = root
            .get("preset")
            .and_then(|p| p.as_str())
            .ok_or_else(|| bad("preset", truncate(json), "missing or not a string"))?
            .to_string();
        let map = root
            .get("values")
            .and_then(|v| v.as_object())
            .ok_or_else(|| bad("values", truncate(json), "missing or not an object"))?;
        let mut values = BTreeMap::new();
        for (key, value) in map {
            let typed = match value {
                serde_json::Value::Bool(b) => ConfigValue::Bool(*b),
                serde_json::Value::String(s) => ConfigValue::Str(s.clone()),
                serde_json::Value::Number(n) => {
                    if let Some(i) = n.as_i64() {
                        ConfigValue::Int(i)
                    } else if let Some(f) = n.as_f64() {
                        ConfigValue::Float(f)
                    } else {
                        return Err(bad(key, n.to_string(), "number out of range"));
                    }
                }
                other => {
                    return Err(bad(
                        key,
                        other.to_string(),
                        "expected a number, bool or string",
                    ))
                }
            };
            values.insert(key.clone(), typed);
        }
        Ok(Self { preset, values })
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> ConfigSchema {
        ConfigSchema::new(
            &[("quick", "fast"), ("paper", "slow")],
            vec![
                ConfigKey::int("epochs", 1, 1000, 160, "epochs").preset("quick", 2),
                ConfigKey::float("lr", 0.0, 10.0, 0.1, "learning rate"),
                ConfigKey::bool("augment", true, "random crop"),
                ConfigKey::str("name", "run", "a name"),
                ConfigKey::choice("solver", &["dopri5", "rk4"], "dopri5", "solver")
                    .preset("quick", "rk4"),
            ],
        )
        .unwrap()
    }

    fn set(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn presets_set_defaults() {
        let s = schema();
        assert_eq!(s.default_preset(), "quick");
        assert_eq!(s.presets(), &["quick", "paper"]);
        let quick = s.resolve("quick", &BTreeMap::new()).unwrap();
        assert_eq!(quick.get_u64("epochs").unwrap(), 2);
        assert_eq!(quick.get_str("solver").unwrap(), "rk4");
        let paper = s.resolve("paper", &BTreeMap::new()).unwrap();
        assert_eq!(paper.get_u64("epochs").unwrap(), 160);
        assert_eq!(paper.get_str("solver").unwrap(), "dopri5");
        assert_eq!(paper.preset(), "paper");
        let default = s.resolve("", &BTreeMap::new()).unwrap();
        assert_eq!(default.preset(), "quick");
    }

    #[test]
    fn overrides_are_typed() {
        let c = schema()
            .resolve(
                "paper",
                &set(&[("lr", "0.05"), ("augment", "no"), ("epochs", "7")]),
            )
            .unwrap();
        assert_eq!(c.get_f64("lr").unwrap(), 0.05);
        assert!(!c.get_bool("augment").unwrap());
        assert_eq!(c.get_usize("epochs").unwrap(), 7);
        // an int reads as a float, not the other way round
        assert_eq!(c.get_f64("epochs").unwrap(), 7.0);
        let err = c.get_u64("lr").unwrap_err();
        assert!(err.to_string().contains("lr"), "{err}");
        let err = c.get_bool("missing").unwrap_err();
        assert!(matches!(err, ConfigError::UnknownKey { .. }));
    }

    #[test]
    fn unknown_preset_and_key_are_errors() {
        let s = schema();
        let err = s.resolve("huge", &BTreeMap::new()).unwrap_err();
        assert!(matches!(err, ConfigError::UnknownPreset { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("huge") && msg.contains("quick, paper"),
            "{msg}"
        );
        let err = s.resolve("quick", &set(&[("lrr", "1")])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("lrr") && msg.contains("lr"), "{msg}");
    }

    #[test]
    fn wrong_types_and_ranges_name_the_key() {
        let s = schema();
        for (key, value, reason) in [
            ("epochs", "two", "integer"),
            ("epochs", "0", "out of range"),
            ("epochs", "1.5", "integer"),
            ("lr", "fast", "number"),
            ("lr", "-0.1", "out of range"),
            ("lr", "NaN", "finite"),
            ("augment", "maybe", "true or false"),
            ("solver", "euler", "dopri5, rk4"),
        ] {
            let err = s.resolve("quick", &set(&[(key, value)])).unwrap_err();
            match &err {
                ConfigError::InvalidValue {
                    key: k, value: v, ..
                } => {
                    assert_eq!(k, key);
                    assert_eq!(v, value);
                }
                other => panic!("unexpected {other:?}"),
            }
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("{key}:")) && msg.contains(reason),
                "{msg}"
            );
        }
    }

    #[test]
    fn json_round_trip() {
        let c = schema()
            .resolve("paper", &set(&[("lr", "1"), ("name", "x y")]))
            .unwrap();
        let json = c.to_json();
        let back = ResolvedConfig::from_json(&json).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.get_f64("lr").unwrap(), 1.0);
        assert!(ResolvedConfig::from_json("{").is_err());
        assert!(ResolvedConfig::from_json("{\"preset\":\"a\"}").is_err());
        let err = ResolvedConfig::from_json(r#"{"preset":"a","values":{"k":[1]}}"#).unwrap_err();
        assert!(err.to_string().starts_with("k:"), "{err}");
    }

    #[test]
    fn bad_schemas_are_rejected() {
        let dup = ConfigSchema::new(
            &[("a", "")],
            vec![
                ConfigKey::bool("x", true, ""),
                ConfigKey::bool("x", true, ""),
            ],
        );
        assert_eq!(dup.unwrap_err(), SchemaError::DuplicateKey("x".into()));
        let bad_default = ConfigSchema::new(&[("a", "")], vec![ConfigKey::int("x", 1, 2, 5, "")]);
        assert!(matches!(bad_default, Err(SchemaError::BadDefault(_))));
        let bad_preset = ConfigSchema::new(
            &[("a", "")],
            vec![ConfigKey::int("x", 1, 2, 1, "").preset("b", 2)],
        );
        assert!(matches!(bad_preset, Err(SchemaError::UnknownPreset { .. })));
        assert_eq!(
            ConfigSchema::new(&[], vec![]).unwrap_err(),
            SchemaError::NoPresets
        );
    }
}
