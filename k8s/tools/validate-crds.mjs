// Validates the custom resources in rendered manifests against the schemas of their CRDs
// (kubernetes-validate only warns about them). Usage: node validate-crds.mjs FILE...
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";
import * as gatewayV1 from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1";

const models = { "gateway.networking.k8s.io/v1": gatewayV1 };
const core = /^(v1|apps\/v1|policy\/v1|autoscaling\/v2|networking\.k8s\.io\/v1)$/;
let checked = 0;
let failed = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of parseAllDocuments(readFileSync(file, "utf8"))) {
    const object = doc.toJS();
    if (!object || core.test(object.apiVersion)) continue;
    const Model = models[object.apiVersion]?.[object.kind];
    const name = `${file}: ${object.apiVersion} ${object.kind} ${object.metadata?.name}`;
    if (!Model) {
      console.error(`FAIL ${name}: no schema known for this custom resource`);
      failed++;
      continue;
    }
    try {
      new Model(object).validate();
      console.log(`ok   ${name}`);
      checked++;
    } catch (error) {
      console.error(`FAIL ${name}: ${error.message}`);
      failed++;
    }
  }
}
console.log(`custom resources: ${checked} valid, ${failed} invalid`);
process.exit(failed === 0 ? 0 : 1);
