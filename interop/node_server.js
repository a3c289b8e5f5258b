// node's http module with its default keep-alive settings, answering as
// interop/content.py says. Usage: node node_server.js PORT
"use strict";
const http = require("http");
const port = Number(process.argv[2]);
const server = http.createServer((req, res) => {
  const m = /^\/d\/\d+\/(\d+)$/.exec(req.url);
  if (!m) {
    res.statusCode = 404;
    res.end("not found\n");
    return;
  }
  const head = Buffer.from(req.url + "\n");
  const body = Buffer.alloc(Math.max(Number(m[1]), head.length), ".");
  head.copy(body);
  res.setHeader("Content-Type", "application/octet-stream");
  res.setHeader("Content-Length", body.length);
  res.end(body);
});
server.listen(port, "127.0.0.1");
process.on("SIGTERM", () => process.exit(0));
