// fal-ai/flux-lora's family through the queue: submit, status polling and result by the URLs the client rebuilds.
import { args, emit, fal, opened } from "./common.mjs";

const result = await fal.subscribe(args.app, { input: args.arguments, logs: true });
emit({ data: result.data, request_id: result.requestId, image: await opened(result.data.images[0].url) });
