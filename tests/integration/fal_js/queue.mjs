// fal.queue: submit with a webhook, status, streamStatus, result, cancel (late, then in time).
import { APP, args, emit, fal, thrown, update } from "./common.mjs";

// fal's own headers as this client writes them: x-fal-runner-hint, x-fal-queue-priority and
// x-fal-request-timeout as an integer ("600").
const submitted = await fal.queue.submit(APP, {
  input: args.arguments,
  webhookUrl: args.webhook_url,
  hint: "lora:style",
  priority: "normal",
  startTimeout: 600,
});
const requestId = submitted.request_id;
const first = await fal.queue.status(APP, { requestId, logs: true });
const stream = await fal.queue.streamStatus(APP, { requestId, logs: true });
const streamed = [];
stream.on("data", (status) => streamed.push(update(status)));
const last = await stream.done();
const result = await fal.queue.result(APP, { requestId });
const final = await fal.queue.status(APP, { requestId, logs: false });
const lateCancel = await thrown(fal.queue.cancel(APP, { requestId }));

const long = await fal.queue.submit(APP, { input: args.long_arguments, webhookUrl: args.webhook_url });
await fal.queue.cancel(APP, { requestId: long.request_id });
const longFinal = await fal.queue.subscribeToStatus(APP, { requestId: long.request_id, logs: true, pollInterval: 100 });
emit({
  submitted,
  first: update(first),
  streamed,
  last: update(last),
  result: { data: result.data, request_id: result.requestId },
  final: update(final),
  late_cancel: lateCancel,
  long_request_id: long.request_id,
  long_final: update(longFinal),
  long_result: await thrown(fal.queue.result(APP, { requestId: long.request_id })),
});
