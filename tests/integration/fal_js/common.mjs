// fal's JS client, unchanged, configured the way docs/fal.md tells users to: credentials and
// a proxyUrl that always applies (Node has no `window`), pointing at the service.
// Each scenario script reads its arguments as JSON from argv[2] and prints one JSON line.
import { createHash } from "node:crypto";
import { createRequire } from "node:module";
import path from "node:path";

// The client is installed under the repository's .tools/ (scripts/test.sh), not beside this file.
const require = createRequire(path.join(process.env.LORASERVE_TOOLS_DIR, "package.json"));
const client = require("@fal-ai/client");

export const { ApiError, ValidationError } = client;
export const APP = "fal-ai/lora";
export const args = JSON.parse(process.argv[2]);
export const fal = client.createFalClient({
  credentials: process.env.FAL_KEY,
  proxyUrl: { url: process.env.FAL_PROXY_URL, when: "always" },
});

export function emit(value) {
  process.stdout.write(JSON.stringify(value) + "\n");
}

/** A queue update as plain JSON: its status, position and log messages. */
export function update(status) {
  return {
    status: status.status,
    position: status.queue_position ?? null,
    logs: status.logs ? status.logs.map((entry) => entry.message) : null,
    error: status.error ?? null,
    error_type: status.error_type ?? null,
  };
}

/** The file behind an output URL (TLS trust from NODE_EXTRA_CA_CERTS, as for the client). */
export async function opened(url) {
  const response = await fetch(url);
  const body = Buffer.from(await response.arrayBuffer());
  return {
    status: response.status,
    content_type: response.headers.get("content-type"),
    bytes: body.length,
    sha256: createHash("sha256").update(body).digest("hex"),
  };
}

/** What the client threw (ApiError / ValidationError fields), or that it did not throw. */
export async function thrown(promise) {
  try {
    await promise;
  } catch (error) {
    return {
      raised: true,
      name: error.constructor.name,
      is_api_error: error instanceof ApiError,
      is_validation_error: error instanceof ValidationError,
      status: error.status ?? null,
      message: error.message,
      body: error.body ?? null,
      request_id: error.requestId ?? null,
      field_errors: error instanceof ValidationError ? error.fieldErrors : null,
    };
  }
  return { raised: false };
}
