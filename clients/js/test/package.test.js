// The package itself: its manifest, one source with what `pgcast serve` embeds, types that
// match the module, and that it installs (from a packed tarball and from its directory, as the
// README shows) and imports in Node.js.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, realpathSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { after, before, test } from "node:test";

import * as client from "pgcast-client";

import { PACKAGE, REPO } from "./support/harness.js";

const manifest = JSON.parse(readFileSync(join(PACKAGE, "package.json"), "utf8"));

function run(cmd, args, cwd) {
  return new Promise((resolvePromise, reject) => {
    execFile(cmd, args, { cwd, timeout: 60_000 }, (error, stdout, stderr) => {
      if (error?.code === "ENOENT") {
        reject(new Error(`${cmd} not found: these tests need npm (Debian: apt-get install npm)`));
      } else if (error) {
        reject(new Error(`${cmd} ${args.join(" ")} failed: ${error.message}\n${stderr}`));
      } else {
        resolvePromise(stdout);
      }
    });
  });
}

test("package.json: ESM, types, exports, a version, no runtime dependencies", () => {
  assert.equal(manifest.name, "pgcast-client");
  assert.equal(manifest.type, "module");
  assert.deepEqual(manifest.exports["."], { types: "./pgcast.d.ts", default: "./pgcast.js" });
  assert.equal(manifest.types, "./pgcast.d.ts");
  for (const field of ["dependencies", "peerDependencies", "optionalDependencies", "bundleDependencies"]) {
    assert.equal(manifest[field], undefined, `no ${field}`);
  }
  // The client speaks the protocol of the pgcast it comes with: the same version.
  const cargo = readFileSync(join(REPO, "Cargo.toml"), "utf8");
  const [, version] = cargo.match(/\[workspace\.package\][^[]*?\nversion\s*=\s*"([^"]+)"/) ?? [];
  assert.equal(manifest.version, version, "package.json version = the workspace's version in Cargo.toml");
});

test("pgcast serve embeds this package's files: one source, not a copy", () => {
  const server = join(REPO, "crates", "pgcast", "src", "server.rs");
  const source = readFileSync(server, "utf8");
  for (const file of ["pgcast.js", "pgcast.d.ts"]) {
    const include = source.match(new RegExp(`include_str!\\("([^"]*/${file.replaceAll(".", "\\.")})"\\)`));
    assert.ok(include, `server.rs has include_str!("…/${file}")`);
    assert.equal(
      realpathSync(resolve(dirname(server), include[1])),
      realpathSync(join(PACKAGE, file)),
      `server.rs's ${include[1]} is clients/js/${file}`,
    );
  }
});

test("the types declare exactly what the module exports", () => {
  const dts = readFileSync(join(PACKAGE, "pgcast.d.ts"), "utf8");
  const declared = [...dts.matchAll(/^export (?:declare )?(?:class|function|const) (\w+)/gm)].map((m) => m[1]);
  assert.deepEqual(declared.sort(), Object.keys(client).sort());
});

let scratch;
before(() => {
  scratch = mkdtempSync(join(tmpdir(), "pgcast-js-pack-"));
});
after(() => rmSync(scratch, { recursive: true, force: true }));

/** A new app directory that installs `spec` and imports the package; returns the entry's path. */
async function installAndImport(name, spec) {
  const app = join(scratch, name);
  mkdirSync(app);
  writeFileSync(join(app, "package.json"), JSON.stringify({ name: `app-${name}`, private: true, type: "module" }));
  await run("npm", ["install", "--offline", "--no-audit", "--no-fund", spec], app);
  const probe = [
    'import { PgcastClient, inQueue, tokenClaims, linkToken } from "pgcast-client";',
    'import { fileURLToPath } from "node:url";',
    "for (const f of [PgcastClient, inQueue, tokenClaims, linkToken]) if (typeof f !== 'function') throw new Error('missing export');",
    'console.log(fileURLToPath(import.meta.resolve("pgcast-client")));',
  ].join("\n");
  writeFileSync(join(app, "probe.mjs"), probe);
  return (await run(process.execPath, ["probe.mjs"], app)).trim();
}

test("npm pack holds the module, its types and the manifest; the tarball installs and imports", async () => {
  const [packed] = JSON.parse(await run("npm", ["pack", "--json", "--pack-destination", scratch], PACKAGE));
  const files = packed.files.map((f) => f.path).sort();
  assert.deepEqual(files, ["README.md", "package.json", "pgcast.d.ts", "pgcast.js"]);
  const entry = await installAndImport("from-tarball", join(scratch, packed.filename));
  assert.equal(readFileSync(entry, "utf8"), readFileSync(join(PACKAGE, "pgcast.js"), "utf8"));
});

test("npm install <repo>/clients/js (the README's way) installs and imports", async () => {
  const entry = await installAndImport("from-path", PACKAGE);
  assert.equal(realpathSync(entry), realpathSync(join(PACKAGE, "pgcast.js")));
});
