//! HPA status from a simulated metric ([`Control::set_metric`]): the
//! desired replica count is `ceil(current × metric / target)` within
//! min/max replicas, written to the HPA's status and, when it differs, to
//! the target's `scale`. The metric is taken as measured at the replica
//! count of the moment it was set; as replicas change, the same load
//! spreads over them (so the HPA settles instead of running away).
//!
//! [`Control::set_metric`]: super::Control::set_metric

use super::{Ctx, Reconciler, i64_at, split_key, str_at};
use crate::machinery::Sub;
use crate::resources::ResourceId;
use crate::resources::ids::{DEPLOYMENTS, HPAS};
use crate::store::Event;
use crate::util;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

const MANAGER: &str = "kube-controller-manager";
const COMPONENT: &str = "horizontal-pod-autoscaler";

/// Drives HPA status.
pub struct HpaController {
    ctx: Ctx,
    /// Per HPA: the metric last set and the replica count it was measured
    /// at (load spreads over more replicas as they come).
    seen: HashMap<String, (f64, i64)>,
}

impl HpaController {
    /// A controller over the shared context.
    pub fn new(ctx: Ctx) -> Self {
        HpaController {
            ctx,
            seen: HashMap::new(),
        }
    }

    fn sync(&mut self, key: &str) -> Result<(), crate::error::ApiError> {
        let m = &self.ctx.machinery;
        let (ns, name) = split_key(key);
        let Ok(hpa) = m.get(HPAS, Some(ns), name) else {
            return Ok(());
        };
        let Some(metric) = self.ctx.control.metric_of(ns, name) else {
            return Ok(());
        };
        let target_name = str_at(&hpa, "/spec/scaleTargetRef/name").unwrap_or("");
        if str_at(&hpa, "/spec/scaleTargetRef/kind") != Some("Deployment") {
            return Ok(());
        }
        let Ok(target) = m.get(DEPLOYMENTS, Some(ns), target_name) else {
            return Ok(());
        };
        let current = i64_at(&target, "/spec/replicas").unwrap_or(1);
        let min = i64_at(&hpa, "/spec/minReplicas").unwrap_or(1);
        let max = i64_at(&hpa, "/spec/maxReplicas").unwrap_or(current.max(1));
        let first = hpa.pointer("/spec/metrics/0").cloned().unwrap_or(json!({}));
        let resource = first
            .pointer("/resource/name")
            .and_then(Value::as_str)
            .unwrap_or("cpu")
            .to_string();
        let (target_value, utilization) = match first
            .pointer("/resource/target/averageUtilization")
            .and_then(Value::as_f64)
        {
            Some(u) => (u, true),
            None => (
                first
                    .pointer("/resource/target/averageValue")
                    .or_else(|| first.pointer("/pods/target/averageValue"))
                    .and_then(|v| v.as_f64().or_else(|| v.as_str()?.parse().ok()))
                    .unwrap_or(80.0),
                false,
            ),
        };
        let base = match self.seen.get(key) {
            Some((m, b)) if *m == metric => *b,
            _ => {
                self.seen.insert(key.to_string(), (metric, current));
                current
            }
        };
        // The load measured at `base` replicas, spread over `current`.
        let metric = metric * base as f64 / current.max(1) as f64;
        let ratio = metric / target_value.max(f64::MIN_POSITIVE);
        let mut desired = if (ratio - 1.0).abs() <= 0.1 {
            current
        } else {
            (current as f64 * ratio).ceil() as i64
        };
        desired = desired.clamp(min, max.max(min));
        let mut status = json!({
            "currentReplicas": current,
            "desiredReplicas": desired,
            "currentMetrics": [{"type": "Resource", "resource": {"name": resource,
                "current": if utilization { json!({"averageUtilization": metric.round() as i64}) }
                           else { json!({"averageValue": metric.to_string()}) }}}],
            "conditions": [
                {"type": "AbleToScale", "status": "True", "reason": "ReadyForNewScale",
                 "message": "recommended size matches current size", "lastTransitionTime": util::now_rfc3339()},
                {"type": "ScalingActive", "status": "True", "reason": "ValidMetricFound",
                 "message": format!("the HPA was able to successfully calculate a replica count from {resource} resource"),
                 "lastTransitionTime": util::now_rfc3339()},
            ],
            "observedGeneration": i64_at(&hpa, "/metadata/generation").unwrap_or(1),
        });
        if let Some(t) = hpa.pointer("/status/lastScaleTime") {
            status["lastScaleTime"] = t.clone();
        }
        if desired != current {
            let mut scale = m.get_scale(DEPLOYMENTS, Some(ns), target_name)?;
            scale["spec"]["replicas"] = json!(desired);
            m.update(
                DEPLOYMENTS,
                Some(ns),
                target_name,
                scale,
                Sub::Scale,
                &Ctx::opts(MANAGER),
            )?;
            status["lastScaleTime"] = json!(util::now_rfc3339());
            status["currentReplicas"] = json!(current);
            self.ctx.event(
                &hpa,
                "autoscaling/v2",
                "HorizontalPodAutoscaler",
                "Normal",
                "SuccessfulRescale",
                &format!(
                    "New size: {desired}; reason: {resource} resource {} {} target",
                    if utilization {
                        "utilization (percentage of request)"
                    } else {
                        ""
                    },
                    if desired > current { "above" } else { "below" }
                ),
                COMPONENT,
                None,
            );
        }
        // Keep condition times while nothing but times changed.
        let old = hpa.get("status").cloned().unwrap_or(json!({}));
        let strip = |s: &Value| {
            let mut s = s.clone();
            if let Some(c) = s.get_mut("conditions").and_then(Value::as_array_mut) {
                for x in c {
                    x.as_object_mut().map(|o| o.remove("lastTransitionTime"));
                }
            }
            s
        };
        if strip(&old) != strip(&status) {
            let mut body = hpa;
            body["status"] = status;
            m.update(HPAS, Some(ns), name, body, Sub::Status, &Ctx::opts(MANAGER))?;
        }
        Ok(())
    }
}

impl Reconciler for HpaController {
    fn resources(&self) -> Vec<ResourceId> {
        vec![HPAS]
    }

    fn keys_of(&mut self, _res: ResourceId, ev: &Event, out: &mut BTreeSet<String>) {
        out.insert(ev.obj.key.to_string());
    }

    fn all_keys(&mut self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let _ = self
            .ctx
            .machinery
            .store()
            .scan(HPAS, None, None, None, |o| {
                out.insert(o.key.to_string());
                true
            });
        out
    }

    fn reconcile(&mut self, key: &str) -> Option<Duration> {
        self.sync(key).err().map(|_| Duration::from_millis(50))
    }

    fn follows_control(&self) -> bool {
        true
    }
}
