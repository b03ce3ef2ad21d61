// Validate the custom resources of rendered manifests (JSON lines on stdin, one
// object each) against the schemas generated from KEDA's and the Prometheus
// Operator's CRDs (@kubernetes-models/*, pinned in package.json). Prints one line per
// object; exits 1 if any is invalid or of a custom kind this script does not know.
import { createInterface } from "node:readline";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1";
import {
  PodMonitor,
  PrometheusRule,
  ServiceMonitor,
} from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const models = {
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "monitoring.coreos.com/v1/PodMonitor": PodMonitor,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
  "monitoring.coreos.com/v1/PrometheusRule": PrometheusRule,
};

let failed = false;
for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const object = JSON.parse(line);
  const key = `${object.apiVersion}/${object.kind}`;
  const Model = models[key];
  const name = `${key} ${object.metadata?.name}`;
  if (!Model) {
    console.log(`UNKNOWN ${name}`);
    failed = true;
    continue;
  }
  try {
    new Model(object).validate();
    console.log(`ok ${name}`);
  } catch (error) {
    console.log(`INVALID ${name}: ${error.message}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
