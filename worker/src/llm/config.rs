//! What one conversation's LLM is: endpoint, model, key, timeouts, retry policy and prices.
//!
//! **Invariant:** the API key lives only in a [`Secret`], whose `Debug` and `Display` print
//! `<redacted>` and which implements neither `Serialize` nor `Deserialize`, so a config can be
//! logged with `?config` and can never end up in an event or a snapshot by accident.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A secret string (an API key). Prints as `<redacted>`; read it with [`Secret::expose`] only
/// where it is sent (the `Authorization` header).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret value itself. Never log or store what this returns.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Lets clap parse `--llm-api-key` / `OH_LLM_API_KEY` straight into a [`Secret`].
impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Secret, Self::Err> {
        Ok(Secret::new(s))
    }
}

/// Price of one model in USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelPrice {
    /// USD per 1M prompt (input) tokens.
    pub input_per_mtok: f64,
    /// USD per 1M completion (output) tokens.
    pub output_per_mtok: f64,
}

impl ModelPrice {
    /// Cost in USD of one call with these token counts.
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        // u64 → f64 loses precision only above 2^53 tokens, which no call reaches.
        let (p, c) = (prompt_tokens as f64, completion_tokens as f64);
        (p * self.input_per_mtok + c * self.output_per_mtok) / 1_000_000.0
    }
}

/// Per-model prices, parsed from `model=in/out,model2=in/out` (USD per 1M input/output
/// tokens), e.g. `gpt-4o=2.5/10,openai/gpt-4o-mini=0.15/0.6`. A model that is not listed costs 0.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PriceTable(BTreeMap<String, ModelPrice>);

impl PriceTable {
    /// Parses `model=in/out,...`; the empty string is the empty table. Model names may contain
    /// `/` and `:` (`openai/gpt-4o`, `llama3:8b`) but not `=` or `,`.
    ///
    /// # Errors
    /// [`PriceParseError`] naming the entry that is not `model=in/out` with two finite,
    /// non-negative numbers.
    pub fn parse(s: &str) -> Result<PriceTable, PriceParseError> {
        let mut table = BTreeMap::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = || PriceParseError {
                entry: entry.to_owned(),
            };
            let (model, prices) = entry.rsplit_once('=').ok_or_else(bad)?;
            let (input, output) = prices.split_once('/').ok_or_else(bad)?;
            let number = |v: &str| {
                v.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(bad)
            };
            let model = model.trim();
            if model.is_empty() {
                return Err(bad());
            }
            table.insert(
                model.to_owned(),
                ModelPrice {
                    input_per_mtok: number(input)?,
                    output_per_mtok: number(output)?,
                },
            );
        }
        Ok(PriceTable(table))
    }

    /// Sets the price of one model.
    pub fn insert(&mut self, model: impl Into<String>, price: ModelPrice) {
        self.0.insert(model.into(), price);
    }

    /// The price of `model`, if listed (exact match).
    pub fn get(&self, model: &str) -> Option<ModelPrice> {
        self.0.get(model).copied()
    }
}

impl FromStr for PriceTable {
    type Err = PriceParseError;

    fn from_str(s: &str) -> Result<PriceTable, PriceParseError> {
        PriceTable::parse(s)
    }
}

/// A price-table entry that is not `model=in/out`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "price entry {entry:?} is not `model=input/output` (USD per 1M tokens, e.g. `gpt-4o=2.5/10`)"
)]
pub struct PriceParseError {
    /// The offending entry.
    pub entry: String,
}

/// One conversation's LLM settings. `Debug` is safe to log: the key prints as `<redacted>`.
#[derive(Debug, Clone)]
pub struct LlmConfig {
    /// Base URL of an OpenAI-compatible API, up to and including the version segment, e.g.
    /// `http://127.0.0.1:8000/v1`; requests go to `{base_url}/chat/completions`.
    pub base_url: String,
    /// Model name sent as `model`, and the key of [`LlmConfig::prices`].
    pub model: String,
    /// Sent as `Authorization: Bearer <key>` when set.
    pub api_key: Option<Secret>,
    /// Limit for one attempt, from connect to the last byte of the response.
    pub timeout: Duration,
    /// Retries after the first attempt (so at most `max_retries + 1` requests per call).
    pub max_retries: u32,
    /// Backoff before the first retry; doubled on each further retry.
    pub retry_min: Duration,
    /// Cap of the backoff, and of a server's `Retry-After`.
    pub retry_max: Duration,
    /// Prices for the cost in `llm_metrics`.
    pub prices: PriceTable,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn price_table_parses_models_with_slashes_and_spaces() {
        let t = PriceTable::parse(" gpt-4o=2.5/10 , openai/gpt-4o-mini = 0.15/0.6,llama3:8b=0/0")
            .unwrap();
        assert_eq!(
            t.get("gpt-4o"),
            Some(ModelPrice {
                input_per_mtok: 2.5,
                output_per_mtok: 10.0
            })
        );
        assert_eq!(t.get("openai/gpt-4o-mini").unwrap().output_per_mtok, 0.6);
        assert_eq!(t.get("llama3:8b").unwrap().input_per_mtok, 0.0);
        assert_eq!(t.get("unknown"), None);
        assert_eq!(PriceTable::parse("").unwrap(), PriceTable::default());
    }

    #[test]
    fn price_table_rejects_malformed_entries() {
        for bad in [
            "gpt", "gpt=1", "=1/2", "m=a/2", "m=1/-2", "m=1/inf", "m=NaN/1",
        ] {
            let err = PriceTable::parse(bad).unwrap_err();
            assert!(
                err.to_string().contains("model=input/output"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn model_price_cost_is_per_million_tokens() {
        let p = ModelPrice {
            input_per_mtok: 2.0,
            output_per_mtok: 10.0,
        };
        assert!((p.cost(1_000_000, 100_000) - 3.0).abs() < 1e-12);
    }

    #[test]
    fn secret_never_prints() {
        let key: Secret = "sk-very-secret".parse().unwrap();
        assert_eq!(format!("{key}"), "<redacted>");
        assert_eq!(format!("{key:?}"), "<redacted>");
        assert_eq!(key.expose(), "sk-very-secret");
        let cfg = LlmConfig {
            base_url: "http://127.0.0.1:1/v1".into(),
            model: "m".into(),
            api_key: Some(key),
            timeout: Duration::from_secs(1),
            max_retries: 0,
            retry_min: Duration::ZERO,
            retry_max: Duration::ZERO,
            prices: PriceTable::default(),
        };
        let shown = format!("{cfg:?} {cfg:#?}");
        assert!(!shown.contains("sk-very-secret"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }
}
