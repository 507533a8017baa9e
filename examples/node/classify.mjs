// Classify JPEG files with an rtk bundle from Node.js, the way a service in another language would:
// decode the JPEG to RGB pixels and hand them to model.any-size.onnx, whose graph resizes and
// center-crops exactly as torchvision does for the eager model. No resize code here.
//
//   node classify.mjs BUNDLE IMAGE.jpg [IMAGE.jpg ...]     -> one JSON line per image
import { readFileSync } from "node:fs";
import { join } from "node:path";
import jpeg from "jpeg-js";
import * as ort from "onnxruntime-node";

const [bundle, ...images] = process.argv.slice(2);
if (!bundle || images.length === 0) {
  console.error("usage: node classify.mjs BUNDLE IMAGE.jpg [IMAGE.jpg ...]");
  process.exit(2);
}
const labels = readFileSync(join(bundle, "labels.txt"), "utf8").split("\n").filter((l) => l.length > 0);
const session = await ort.InferenceSession.create(join(bundle, "model.any-size.onnx"));

function rgb(path) {
  // jpeg-js gives RGBA; the model takes RGB uint8 [1, H, W, 3]. (EXIF orientation is not applied here.)
  const { width, height, data } = jpeg.decode(readFileSync(path), { useTArray: true, formatAsRGBA: true });
  const pixels = new Uint8Array(width * height * 3);
  for (let i = 0, j = 0; i < data.length; i += 4, j += 3) {
    pixels[j] = data[i];
    pixels[j + 1] = data[i + 1];
    pixels[j + 2] = data[i + 2];
  }
  return new ort.Tensor("uint8", pixels, [1, height, width, 3]);
}

let failed = 0;
for (const path of images) {
  try {
    const { logits } = await session.run({ image: rgb(path) });
    const values = Array.from(logits.data);
    const top = values.indexOf(Math.max(...values));
    const exp = values.map((v) => Math.exp(v - values[top]));
    const sum = exp.reduce((a, b) => a + b, 0);
    console.log(JSON.stringify({ file: path, label: labels[top], index: top, score: exp[top] / sum, logits: values }));
  } catch (err) {
    failed += 1;
    console.log(JSON.stringify({ file: path, error: String(err.message || err).split("\n")[0] }));
  }
}
process.exit(failed ? 1 : 0);
