// fal.storage.upload, then its URL as a LoRA of a real request; and a File inside the input,
// which the client uploads by itself before submitting.
import { readFile } from "node:fs/promises";
import { APP, args, emit, fal, opened } from "./common.mjs";

const weights = await readFile(args.lora_file);
const file = () => new File([weights], "style.safetensors", { type: "application/octet-stream" });
const uploaded = await fal.storage.upload(file());
const images = {};
for (const [name, path] of [["local", args.lora_file], ["uploaded", uploaded], ["in_input", file()]]) {
  const result = await fal.subscribe(APP, { input: { ...args.arguments, loras: [{ path }] }, pollInterval: 100 });
  images[name] = await opened(result.data.images[0].url);
}
emit({ uploaded, images });
