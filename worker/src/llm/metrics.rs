//! Accumulated cost, token usage and latencies of one conversation's LLM, in OpenHands'
//! `llm_metrics` shape.
//!
//! **Invariant:** a [`Metrics`] serializes to exactly OpenHands' `Metrics.get()` object
//! (`accumulated_cost`, `max_budget_per_task`, `accumulated_token_usage`, `costs`,
//! `response_latencies`, `token_usages`, in that order) and deserializes from it, so the
//! controller can snapshot it and restore it on another worker. Events carry the trimmed form
//! ([`Metrics::snapshot_json`]: the three lists empty). Each list keeps the last
//! [`MAX_LIST_LEN`] records, as OpenHands does; the totals are always exact.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use super::config::ModelPrice;
use super::message::Usage;

/// Most records kept in each per-call list (OpenHands' `_MAX_LIST_SIZE`).
pub const MAX_LIST_LEN: usize = 500;

/// Token usage of one call, or accumulated (OpenHands `TokenUsage`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenUsage {
    /// Model name.
    pub model: String,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Prompt tokens read from the provider's cache.
    pub cache_read_tokens: u64,
    /// Prompt tokens written to the provider's cache.
    pub cache_write_tokens: u64,
    /// Context window of the model (0: unknown).
    pub context_window: u64,
    /// Prompt plus completion tokens of the latest call.
    pub per_turn_token: u64,
    /// Response id (`""` in the accumulated record).
    pub response_id: String,
}

/// Cost of one call (OpenHands `Cost`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    /// Model name.
    pub model: String,
    /// USD.
    pub cost: f64,
    /// Unix time in seconds.
    #[serde(default)]
    pub timestamp: f64,
}

/// Latency of one call (OpenHands `ResponseLatency`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseLatency {
    /// Model name.
    pub model: String,
    /// Seconds.
    pub latency: f64,
    /// Response id.
    #[serde(default)]
    pub response_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct Data {
    accumulated_cost: f64,
    max_budget_per_task: Option<f64>,
    accumulated_token_usage: TokenUsage,
    costs: Vec<Cost>,
    response_latencies: Vec<ResponseLatency>,
    token_usages: Vec<TokenUsage>,
}

/// The metrics of one LLM. Shared by reference: [`super::Llm::complete`] records into it while
/// readers take snapshots. (De)serializes as OpenHands' full `llm_metrics` object.
#[derive(Debug, Default)]
pub struct Metrics {
    data: Mutex<Data>,
}

impl Metrics {
    /// Empty metrics for `model`.
    pub fn new(model: impl Into<String>) -> Metrics {
        let data = Data {
            accumulated_token_usage: TokenUsage {
                model: model.into(),
                ..TokenUsage::default()
            },
            ..Data::default()
        };
        Metrics {
            data: Mutex::new(data),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Data> {
        // Every update leaves `Data` consistent, so a panic elsewhere can't corrupt it.
        self.data.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records one successful call: its usage, its latency and, if the model has a price,
    /// its cost (an unpriced model adds no cost record, as in OpenHands).
    pub(super) fn record(
        &self,
        model: &str,
        price: Option<ModelPrice>,
        usage: Usage,
        latency: Duration,
        response_id: &str,
    ) {
        let mut d = self.lock();
        if let Some(price) = price {
            let cost = price.cost(usage.prompt_tokens, usage.completion_tokens);
            d.accumulated_cost += cost;
            push_capped(
                &mut d.costs,
                Cost {
                    model: model.to_owned(),
                    cost,
                    timestamp: unix_now(),
                },
            );
        }
        push_capped(
            &mut d.response_latencies,
            ResponseLatency {
                model: model.to_owned(),
                latency: latency.as_secs_f64(),
                response_id: response_id.to_owned(),
            },
        );
        let per_turn_token = usage.prompt_tokens + usage.completion_tokens;
        push_capped(
            &mut d.token_usages,
            TokenUsage {
                model: model.to_owned(),
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                cache_read_tokens: usage.cache_read_tokens,
                cache_write_tokens: usage.cache_write_tokens,
                context_window: 0,
                per_turn_token,
                response_id: response_id.to_owned(),
            },
        );
        let acc = &mut d.accumulated_token_usage;
        acc.prompt_tokens += usage.prompt_tokens;
        acc.completion_tokens += usage.completion_tokens;
        acc.cache_read_tokens += usage.cache_read_tokens;
        acc.cache_write_tokens += usage.cache_write_tokens;
        acc.per_turn_token = per_turn_token;
    }

    /// Total cost in USD so far.
    pub fn accumulated_cost(&self) -> f64 {
        self.lock().accumulated_cost
    }

    /// Token counts so far.
    pub fn accumulated_token_usage(&self) -> TokenUsage {
        self.lock().accumulated_token_usage.clone()
    }

    /// Number of recorded calls still in the latency list (at most [`MAX_LIST_LEN`]).
    pub fn recorded_calls(&self) -> usize {
        self.lock().response_latencies.len()
    }

    /// The budget shown as `max_budget_per_task` (`null` when `None`). Only recorded here;
    /// enforcing it is the controller's job.
    pub fn set_max_budget_per_task(&self, budget: Option<f64>) {
        self.lock().max_budget_per_task = budget;
    }

    /// The trimmed `llm_metrics` object that agent actions carry: totals, with `costs`,
    /// `response_latencies` and `token_usages` empty.
    pub fn snapshot_json(&self) -> Value {
        let d = self.lock();
        let trimmed = Data {
            accumulated_cost: d.accumulated_cost,
            max_budget_per_task: d.max_budget_per_task,
            accumulated_token_usage: d.accumulated_token_usage.clone(),
            costs: Vec::new(),
            response_latencies: Vec::new(),
            token_usages: Vec::new(),
        };
        drop(d);
        data_json(&trimmed)
    }

    /// The full `llm_metrics` object (lists included), as serde would write it.
    pub fn full_json(&self) -> Value {
        data_json(&self.lock())
    }

    /// Replaces everything with `other`'s contents (restore after a failover).
    pub fn restore(&self, other: Metrics) {
        *self.lock() = other
            .data
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
    }
}

fn data_json(d: &Data) -> Value {
    // Serializing plain numbers, strings and lists into a Value can't fail, but NaN costs
    // would become null rather than an error; prices are validated finite at parse time.
    serde_json::to_value(d).unwrap_or(Value::Null)
}

impl Clone for Metrics {
    fn clone(&self) -> Metrics {
        Metrics {
            data: Mutex::new(self.lock().clone()),
        }
    }
}

impl PartialEq for Metrics {
    fn eq(&self, other: &Metrics) -> bool {
        std::ptr::eq(self, other) || *self.lock() == *other.lock()
    }
}

impl Serialize for Metrics {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.lock().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Metrics {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Metrics, D::Error> {
        Data::deserialize(deserializer).map(|data| Metrics {
            data: Mutex::new(data),
        })
    }
}

fn push_capped<T>(list: &mut Vec<T>, item: T) {
    list.push(item);
    if list.len() > MAX_LIST_LEN {
        let excess = list.len() - MAX_LIST_LEN;
        list.drain(..excess);
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn usage(p: u64, c: u64) -> Usage {
        Usage {
            prompt_tokens: p,
            completion_tokens: c,
            cache_read_tokens: 1,
            cache_write_tokens: 0,
        }
    }

    #[test]
    fn snapshot_has_openhands_shape_in_order() {
        let m = Metrics::new("gpt-x");
        let price = ModelPrice {
            input_per_mtok: 1.0,
            output_per_mtok: 2.0,
        };
        m.record(
            "gpt-x",
            Some(price),
            usage(1000, 500),
            Duration::from_millis(250),
            "r1",
        );
        m.record(
            "gpt-x",
            Some(price),
            usage(2000, 0),
            Duration::from_millis(50),
            "r2",
        );
        let snap = m.snapshot_json();
        let keys: Vec<_> = snap.as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            keys,
            [
                "accumulated_cost",
                "max_budget_per_task",
                "accumulated_token_usage",
                "costs",
                "response_latencies",
                "token_usages"
            ]
        );
        assert!((snap["accumulated_cost"].as_f64().unwrap() - 0.004).abs() < 1e-12);
        assert_eq!(
            snap["accumulated_token_usage"],
            json!({"model": "gpt-x", "prompt_tokens": 3000, "completion_tokens": 500,
                   "cache_read_tokens": 2, "cache_write_tokens": 0, "context_window": 0,
                   "per_turn_token": 2000, "response_id": ""})
        );
        assert_eq!(snap["max_budget_per_task"], Value::Null);
        assert_eq!(snap["costs"], json!([]));
        let full = m.full_json();
        assert_eq!(full["costs"].as_array().unwrap().len(), 2);
        assert_eq!(full["response_latencies"][0]["latency"], json!(0.25));
        assert_eq!(full["token_usages"][1]["response_id"], "r2");
    }

    #[test]
    fn unpriced_model_costs_nothing_and_roundtrips() {
        let m = Metrics::new("local");
        m.record("local", None, usage(10, 5), Duration::from_millis(1), "r");
        m.set_max_budget_per_task(Some(2.5));
        assert_eq!(m.accumulated_cost(), 0.0);
        let text = serde_json::to_string(&m).unwrap();
        let back: Metrics = serde_json::from_str(&text).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.full_json()["costs"], json!([]));
        assert_eq!(back.snapshot_json()["max_budget_per_task"], json!(2.5));
        let restored = Metrics::new("other");
        restored.restore(back);
        assert_eq!(restored.accumulated_token_usage().prompt_tokens, 10);
        // OpenHands' own (older, partial) objects are readable too.
        let legacy: Metrics = serde_json::from_value(json!({"accumulated_cost": 0.5})).unwrap();
        assert_eq!(legacy.accumulated_cost(), 0.5);
    }

    #[test]
    fn lists_are_capped_but_totals_exact() {
        let m = Metrics::new("m");
        for _ in 0..(MAX_LIST_LEN + 10) {
            m.record("m", None, usage(1, 1), Duration::ZERO, "r");
        }
        assert_eq!(m.recorded_calls(), MAX_LIST_LEN);
        assert_eq!(
            m.accumulated_token_usage().prompt_tokens,
            (MAX_LIST_LEN + 10) as u64
        );
    }
}
