// Reference runner: face-api's AgeGenderNet (wasm backend) on face crops, one JSON line per image.
//
//   node s2f/faceapi/run_agegender.mjs [--node-dir DIR] [--model-dir DIR] IMAGE...
//
// IMAGE is an already cropped face: .npy (uint8, H x W x 3 RGB, C order) or .jpg/.jpeg (jpeg-js).
// The .npy form hands over the exact pixels s2f itself uses: no two JPEG decoders are compared.
// Detection is skipped: predictAgeAndGender runs on the whole image, as s2f.agegender.predict does.
// Output per image: {"path", "age", "gender", "genderProbability", "probMale", "backend"}.
// Installed by scripts/fetch-faceapi.sh into .cache/faceapi/ (node_modules + weights).
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const CACHE = path.resolve(HERE, '..', '..', '.cache', 'faceapi');
const DEFAULT_NODE_DIR = path.join(CACHE, 'node');
const DEFAULT_MODEL_DIR = path.join(CACHE, 'model');
const FIX = 'run scripts/fetch-faceapi.sh';
const NPY_MAGIC = '\x93NUMPY';
const MANIFEST = 'age_gender_model-weights_manifest.json';

function parseArgs(argv) {
  const args = { nodeDir: DEFAULT_NODE_DIR, modelDir: DEFAULT_MODEL_DIR, images: [] };
  for (let i = 0; i < argv.length; i += 1) {
    if (argv[i] === '--node-dir') args.nodeDir = argv[++i];
    else if (argv[i] === '--model-dir') args.modelDir = argv[++i];
    else args.images.push(argv[i]);
  }
  if (!args.images.length) {
    throw new Error('run_agegender: no images given; pass .npy or .jpg face crops');
  }
  return args;
}

// The packages live under .cache/faceapi/node (git-ignored), not next to this file, so resolve
// them from there; face-api's own require('@tensorflow/tfjs') then finds the same tfjs instance.
function loadPackages(nodeDir) {
  const manifest = path.join(nodeDir, 'package.json');
  if (!fs.existsSync(path.join(nodeDir, 'node_modules', '@vladmandic', 'face-api'))) {
    throw new Error(`run_agegender: ${nodeDir}/node_modules has no @vladmandic/face-api; ${FIX}`);
  }
  const require = createRequire(manifest);
  return {
    tf: require('@tensorflow/tfjs'),
    wasm: require('@tensorflow/tfjs-backend-wasm'),
    // The default entry wants tfjs-node (a native download); the wasm entry runs anywhere.
    faceapi: require('@vladmandic/face-api/dist/face-api.node-wasm.js'),
    jpeg: require('jpeg-js'),
    wasmDir: path.join(path.dirname(require.resolve('@tensorflow/tfjs-backend-wasm')), path.sep),
  };
}

// Minimal .npy reader: uint8, C order, shape (H, W, 3); anything else is refused, not guessed.
function readNpy(file) {
  const buf = fs.readFileSync(file);
  if (buf.toString('latin1', 0, 6) !== NPY_MAGIC) throw new Error(`${file}: not a .npy file`);
  const major = buf[6];
  const headerLen = major === 1 ? buf.readUInt16LE(8) : buf.readUInt32LE(8);
  const start = (major === 1 ? 10 : 12);
  const header = buf.toString('latin1', start, start + headerLen);
  if (!/'descr':\s*'\|u1'/.test(header) || /'fortran_order':\s*True/.test(header)) {
    throw new Error(`${file}: expected a uint8 C-order array; `
      + 'save it with np.save(path, np.ascontiguousarray(img, np.uint8))');
  }
  const dims = header.match(/'shape':\s*\(([^)]*)\)/)[1].split(',');
  const shape = dims.filter((s) => s.trim()).map(Number);
  if (shape.length !== 3 || shape[2] !== 3) {
    throw new Error(`${file}: shape (${shape}) is not (H, W, 3)`);
  }
  const data = new Int32Array(buf.subarray(start + headerLen));
  return { data, height: shape[0], width: shape[1] };
}

function readJpeg(file, jpeg) {
  const img = jpeg.decode(fs.readFileSync(file), { useTArray: true, formatAsRGBA: false });
  return { data: new Int32Array(img.data), height: img.height, width: img.width };
}

// (H, W, 3) int32 tensor, as face-api's own node demos build it.
function readImage(file, pkgs) {
  const ext = path.extname(file).toLowerCase();
  let img;
  if (ext === '.npy') img = readNpy(file);
  else if (ext === '.jpg' || ext === '.jpeg') img = readJpeg(file, pkgs.jpeg);
  else throw new Error(`${file}: type ${ext} unsupported; pass .npy or .jpg`);
  return pkgs.tf.tensor3d(img.data, [img.height, img.width, 3], 'int32');
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const pkgs = loadPackages(args.nodeDir);
  pkgs.wasm.setWasmPaths(pkgs.wasmDir);
  await pkgs.tf.setBackend('wasm');
  await pkgs.tf.ready();
  if (!fs.existsSync(path.join(args.modelDir, MANIFEST))) {
    throw new Error(`run_agegender: ${args.modelDir} has no ${MANIFEST}; ${FIX}`);
  }
  await pkgs.faceapi.nets.ageGenderNet.loadFromDisk(args.modelDir);
  for (const file of args.images) {
    const tensor = readImage(file, pkgs);
    const res = await pkgs.faceapi.nets.ageGenderNet.predictAgeAndGender(tensor);
    tensor.dispose();
    const probMale = res.gender === 'male' ? res.genderProbability : 1 - res.genderProbability;
    const line = {
      path: file,
      age: res.age,
      gender: res.gender,
      genderProbability: res.genderProbability,
      probMale,
      backend: pkgs.tf.getBackend(),
    };
    process.stdout.write(`${JSON.stringify(line)}\n`);
  }
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
