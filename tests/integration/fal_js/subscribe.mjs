// fal.subscribe with logs and onQueueUpdate, polling or over the SSE status stream (args.mode).
import { APP, args, emit, fal, opened, update } from "./common.mjs";

// A request ahead of ours keeps the one worker busy, so ours is seen waiting first.
const blocker = await fal.queue.submit(APP, { input: args.blocker_arguments });
const updates = [];
let enqueued = null;
const result = await fal.subscribe(APP, {
  input: args.arguments,
  logs: true,
  mode: args.mode,
  pollInterval: 100,
  onEnqueue: (requestId) => {
    enqueued = requestId;
  },
  onQueueUpdate: (status) => updates.push(update(status)),
});
emit({
  blocker: update(await fal.queue.status(APP, { requestId: blocker.request_id })),
  enqueued,
  request_id: result.requestId,
  data: result.data,
  updates,
  image: await opened(result.data.images[0].url),
});
