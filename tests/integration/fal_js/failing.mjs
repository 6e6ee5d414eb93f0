// Requests that fail: refused input, and one that fails while running. fal.subscribe throws
// the client's ValidationError either way; fieldErrors say what failed.
import { APP, args, emit, fal, thrown } from "./common.mjs";

const invalid = await thrown(fal.subscribe(APP, { input: args.invalid_arguments, pollInterval: 100 }));
let failingEnqueued = null;
const failing = await thrown(
  fal.subscribe(APP, {
    input: args.failing_arguments,
    pollInterval: 100,
    onEnqueue: (requestId) => {
      failingEnqueued = requestId;
    },
  }),
);
emit({ invalid, failing, failing_enqueued: failingEnqueued });
