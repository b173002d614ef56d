//! The daemon's metrics as OTLP metrics: the OpenMetrics text [`super::metrics::Metrics`]
//! renders (with `prometheus-client`) read back family by family, so every figure is
//! defined once and Prometheus and OTLP always agree.
//!
//! Counters become cumulative monotonic sums, gauges and info metrics gauges, histograms
//! explicit-bucket histograms (OpenMetrics' cumulative `le` buckets turned into per-bucket
//! counts); labels become attributes. Only the text `prometheus-client` writes is read, so
//! anything else (a state set, a summary) is skipped rather than guessed at.

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
    Metric, NumberDataPoint, Sum,
};

/// One sample line: the name's suffix after its family's name, the labels, the value.
#[derive(Debug)]
struct Sample {
    suffix: String,
    labels: Vec<(String, String)>,
    value: f64,
}

#[derive(Debug)]
struct Family {
    name: String,
    kind: String,
    help: String,
    samples: Vec<Sample>,
}

/// Every family of `text` as an OTLP metric, its points stamped `now` (Unix nanoseconds) and
/// cumulative since `start`.
pub fn to_otlp(text: &str, start: u64, now: u64) -> Vec<Metric> {
    parse(text)
        .into_iter()
        .filter_map(|family| convert(family, start, now))
        .collect()
}

fn parse(text: &str) -> Vec<Family> {
    let mut families: Vec<Family> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            families.push(Family {
                name: name.to_owned(),
                kind: kind.trim().to_owned(),
                help: String::new(),
                samples: Vec::new(),
            });
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            // HELP comes before TYPE in prometheus-client's text: kept for the next family.
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            families.push(Family {
                name: name.to_owned(),
                kind: String::new(),
                help: unescape(help),
                samples: Vec::new(),
            });
        } else if !line.starts_with('#') && !line.is_empty() {
            let Some(family) = families.last_mut() else {
                continue;
            };
            if let Some(sample) = sample(line, &family.name) {
                family.samples.push(sample);
            }
        }
    }
    // A HELP and the TYPE after it describe one family.
    let mut merged: Vec<Family> = Vec::new();
    for family in families {
        match merged.last_mut() {
            Some(last) if last.name == family.name && last.kind.is_empty() => {
                last.kind = family.kind;
                last.samples.extend(family.samples);
            }
            _ => merged.push(family),
        }
    }
    merged
}

/// Reads `name{labels} value`, whose name starts with `family`.
fn sample(line: &str, family: &str) -> Option<Sample> {
    let suffix_and_rest = line.strip_prefix(family)?;
    let split = suffix_and_rest.find(['{', ' '])?;
    let suffix = suffix_and_rest[..split].to_owned();
    let mut rest = &suffix_and_rest[split..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = label_set(inner)?;
        labels = parsed;
        rest = after;
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        suffix,
        labels,
        value,
    })
}

/// Reads `key="value",…}` and returns the labels and what follows the `}`.
fn label_set(mut text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        text = text.trim_start_matches(',');
        if let Some(after) = text.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, rest) = text.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.to_owned(), value));
        text = &rest[end + 1..];
    }
}

fn unescape(text: &str) -> String {
    text.replace("\\n", "\n").replace("\\\\", "\\")
}

fn attributes(labels: &[(String, String)]) -> Vec<KeyValue> {
    labels
        .iter()
        .map(|(k, v)| KeyValue {
            key: k.clone(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.clone())),
            }),
            ..Default::default()
        })
        .collect()
}

fn point(sample: &Sample, start: u64, now: u64) -> NumberDataPoint {
    NumberDataPoint {
        attributes: attributes(&sample.labels),
        start_time_unix_nano: start,
        time_unix_nano: now,
        value: Some(number_data_point::Value::AsDouble(sample.value)),
        ..Default::default()
    }
}

/// The unit UCUM names for the suffix Prometheus conventions put on a name.
fn unit(name: &str) -> &'static str {
    if name.ends_with("_seconds") {
        "s"
    } else if name.ends_with("_bytes") {
        "By"
    } else {
        ""
    }
}

fn convert(family: Family, start: u64, now: u64) -> Option<Metric> {
    // The points of the samples whose name ends in `suffix` after the family's.
    let points = |suffix: &str| -> Vec<NumberDataPoint> {
        family
            .samples
            .iter()
            .filter(|s| s.suffix == suffix)
            .map(|s| point(s, start, now))
            .collect()
    };
    let data = match family.kind.as_str() {
        "counter" => metric::Data::Sum(Sum {
            data_points: points("_total"),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        }),
        "gauge" | "unknown" => metric::Data::Gauge(Gauge {
            data_points: points(""),
        }),
        "info" => metric::Data::Gauge(Gauge {
            data_points: points("_info"),
        }),
        "histogram" => metric::Data::Histogram(Histogram {
            data_points: histogram_points(&family.samples, start, now),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
        }),
        _ => return None,
    };
    Some(Metric {
        unit: unit(&family.name).into(),
        name: family.name,
        description: family.help,
        data: Some(data),
        ..Default::default()
    })
}

/// A histogram point being gathered: its labels (without `le`), the point, and its
/// `(bound, cumulative count)` buckets.
type Pending = (Vec<(String, String)>, HistogramDataPoint, Vec<(f64, f64)>);

/// Histogram points, one per label set (without `le`): OpenMetrics' cumulative buckets as
/// per-bucket counts over the finite bounds (the last count is the `+Inf` bucket's).
fn histogram_points(samples: &[Sample], start: u64, now: u64) -> Vec<HistogramDataPoint> {
    let mut points: Vec<Pending> = Vec::new();
    for s in samples {
        let labels: Vec<(String, String)> = s
            .labels
            .iter()
            .filter(|(k, _)| k != "le")
            .cloned()
            .collect();
        let index = match points.iter().position(|(l, _, _)| *l == labels) {
            Some(i) => i,
            None => {
                let point = HistogramDataPoint {
                    attributes: attributes(&labels),
                    start_time_unix_nano: start,
                    time_unix_nano: now,
                    ..Default::default()
                };
                points.push((labels, point, Vec::new()));
                points.len() - 1
            }
        };
        let (_, point, buckets) = &mut points[index];
        match s.suffix.as_str() {
            "_count" => point.count = s.value as u64,
            "_sum" => point.sum = Some(s.value),
            "_bucket" => {
                let le = s
                    .labels
                    .iter()
                    .find(|(k, _)| k == "le")
                    .map(|(_, v)| v.as_str());
                let bound = match le {
                    Some("+Inf") => f64::INFINITY,
                    Some(v) => match v.parse() {
                        Ok(b) => b,
                        Err(_) => continue,
                    },
                    None => continue,
                };
                buckets.push((bound, s.value));
            }
            _ => {}
        }
    }
    points
        .into_iter()
        .map(|(_, mut point, mut buckets)| {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut below = 0.0;
            for (bound, cumulative) in buckets {
                if bound.is_finite() {
                    point.explicit_bounds.push(bound);
                }
                point
                    .bucket_counts
                    .push((cumulative - below).max(0.0) as u64);
                below = cumulative;
            }
            point
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP torud_plugin_up 1 when the plugin is running and healthy.
# TYPE torud_plugin_up gauge
torud_plugin_up{plugin="hello"} 1
torud_plugin_up{plugin="a\"b"} 0
# HELP torud_plugin_restarts Restarts after failures since the daemon started.
# TYPE torud_plugin_restarts counter
torud_plugin_restarts_total{plugin="hello"} 3
# HELP torud_build The daemon's version.
# TYPE torud_build info
torud_build_info{version="0.1.0"} 1
# HELP torud_forwarded_request_duration_seconds Latency.
# TYPE torud_forwarded_request_duration_seconds histogram
torud_forwarded_request_duration_seconds_sum{plugin="hello",op="call"} 0.5
torud_forwarded_request_duration_seconds_count{plugin="hello",op="call"} 4
torud_forwarded_request_duration_seconds_bucket{le="0.1",plugin="hello",op="call"} 1
torud_forwarded_request_duration_seconds_bucket{le="0.25",plugin="hello",op="call"} 3
torud_forwarded_request_duration_seconds_bucket{le="+Inf",plugin="hello",op="call"} 4
# EOF
"#;

    fn metric<'a>(metrics: &'a [Metric], name: &str) -> &'a Metric {
        metrics.iter().find(|m| m.name == name).unwrap()
    }

    fn label<'a>(point: &'a [KeyValue], key: &str) -> Option<&'a str> {
        point.iter().find(|kv| kv.key == key).and_then(|kv| {
            match kv.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(s) => Some(s.as_str()),
                _ => None,
            }
        })
    }

    #[test]
    fn gauges_counters_info_and_histograms_convert() {
        let metrics = to_otlp(TEXT, 10, 20);
        assert_eq!(metrics.len(), 4);

        let up = metric(&metrics, "torud_plugin_up");
        assert_eq!(up.description, "1 when the plugin is running and healthy.");
        let Some(metric::Data::Gauge(g)) = &up.data else {
            panic!("{up:?}")
        };
        assert_eq!(g.data_points.len(), 2);
        assert_eq!(label(&g.data_points[1].attributes, "plugin"), Some("a\"b"));
        assert_eq!(
            g.data_points[0].value,
            Some(number_data_point::Value::AsDouble(1.0))
        );
        assert_eq!(
            (
                g.data_points[0].start_time_unix_nano,
                g.data_points[0].time_unix_nano
            ),
            (10, 20)
        );

        let Some(metric::Data::Sum(sum)) = &metric(&metrics, "torud_plugin_restarts").data else {
            panic!()
        };
        assert!(sum.is_monotonic);
        assert_eq!(
            sum.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        assert_eq!(
            sum.data_points[0].value,
            Some(number_data_point::Value::AsDouble(3.0))
        );

        let Some(metric::Data::Gauge(info)) = &metric(&metrics, "torud_build").data else {
            panic!()
        };
        assert_eq!(
            label(&info.data_points[0].attributes, "version"),
            Some("0.1.0")
        );

        let latency = metric(&metrics, "torud_forwarded_request_duration_seconds");
        assert_eq!(latency.unit, "s");
        let Some(metric::Data::Histogram(h)) = &latency.data else {
            panic!()
        };
        let p = &h.data_points[0];
        assert_eq!((p.count, p.sum), (4, Some(0.5)));
        assert_eq!(p.explicit_bounds, vec![0.1, 0.25]);
        assert_eq!(p.bucket_counts, vec![1, 2, 1], "per bucket, not cumulative");
        assert_eq!(label(&p.attributes, "le"), None);
        assert_eq!(label(&p.attributes, "op"), Some("call"));
    }

    #[test]
    fn the_daemons_own_text_converts_whole() {
        // Whatever the registry writes is read: every family with a TYPE becomes a metric.
        let types = TEXT.lines().filter(|l| l.starts_with("# TYPE")).count();
        assert_eq!(to_otlp(TEXT, 0, 0).len(), types);
        assert!(
            to_otlp("garbage\n{{{\n# TYPE x gauge\nx{a=\"unterminated 1\n", 0, 0)
                .iter()
                .all(|m| match &m.data {
                    Some(metric::Data::Gauge(g)) => g.data_points.is_empty(),
                    _ => true,
                })
        );
    }
}
