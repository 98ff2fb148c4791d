// One synchronous prompt through the official OpenCode SDK on Node, as an SDK user writes it,
// with Node's fetch timeouts (300 s for headers and between body bytes by default) scaled to
// the third argument in milliseconds. Prints one JSON line: {ok, texts} or {ok:false, error}.
// Used by tests/sdk_node.rs.
import { Agent, setGlobalDispatcher } from "undici";
import { createOpencodeClient } from "@opencode-ai/sdk";

const [baseUrl, text, timeoutMs] = process.argv.slice(2);
const timeout = Number(timeoutMs);
// Node's built-in fetch reads the same global dispatcher as undici's.
setGlobalDispatcher(new Agent({ headersTimeout: timeout, bodyTimeout: timeout }));

const client = createOpencodeClient({ baseUrl });
try {
  const session = await client.session.create({ body: {} });
  const res = await client.session.prompt({
    path: { id: session.data.id },
    body: { parts: [{ type: "text", text }] },
  });
  if (res.error || !res.data) {
    console.log(JSON.stringify({ ok: false, status: res.response?.status, error: JSON.stringify(res.error) }));
  } else {
    const texts = (res.data.parts || []).filter((p) => p.type === "text").map((p) => p.text);
    console.log(JSON.stringify({ ok: true, texts }));
  }
} catch (e) {
  console.log(JSON.stringify({ ok: false, error: `${e}`, cause: `${e?.cause ?? ""}` }));
}
