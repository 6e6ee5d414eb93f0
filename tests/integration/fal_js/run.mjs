// fal.run: the synchronous run.
import { APP, args, emit, fal, opened } from "./common.mjs";

const result = await fal.run(APP, { input: args.arguments });
emit({ data: result.data, request_id: result.requestId, image: await opened(result.data.images[0].url) });
