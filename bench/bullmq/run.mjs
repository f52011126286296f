#!/usr/bin/env node
// BullMQ baseline for notifier's benchmark: the alternative notifier replaces, i.e. a BullMQ
// worker (Node.js + Redis) that fans each event out into one delivery job per
// (recipient, channel) and performs each delivery as one HTTP POST to a provider. With
// --pg-url, the same worker also tracks every delivery durably in PostgreSQL: the fan-out
// inserts the event's status rows (one multi-row INSERT) before it enqueues the delivery jobs,
// and each delivery job records the provider's reply (group-committed UPDATEs) before it
// completes.
//
// One coordinator process (this one, started without --role) checks Redis (and PostgreSQL),
// clears this run's queue keys, forks --processes worker processes (each runs an "events"
// Worker and a "deliveries" Worker), waits until they are ready, enqueues the events, collects
// progress over IPC and prints one JSON line. See README.md beside this file.

import { fork } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { createRequire } from 'node:module';
import { randomBytes } from 'node:crypto';

import { Queue, Worker } from 'bullmq';
import IORedis from 'ioredis';
import pg from 'pg';
import { Pool } from 'undici';

const SELF = fileURLToPath(import.meta.url);
const SCHEMA = new URL('schema.sql', import.meta.url);
const BULLMQ_VERSION = createRequire(import.meta.url)('bullmq/package.json').version;
const EVENT_TYPES = ['comment.created', 'mention.created', 'invite.accepted', 'task.assigned'];

// High-resolution wall clock in ms, comparable across the processes of one machine.
const now = () => performance.timeOrigin + performance.now();

function die(message, code = 2) {
  process.stderr.write(`bench-bullmq: ${message}\n`);
  process.exit(code);
}

// ---------------------------------------------------------------------------------------------
// options

const USAGE = `usage: node run.mjs --provider-url URL [options]
  --events N             events to enqueue (default 2000)
  --recipients-min N     recipients per event, lower bound (default 1)
  --recipients-max N     recipients per event, upper bound (default 5)
  --channels LIST        comma-separated channel names (default push,email,in_app)
  --channels-min N       channels per event, lower bound (default 1)
  --channels-max N       channels per event, upper bound (default: number of channels)
  --users N              size of the user-id pool recipients are drawn from (default 10000)
  --concurrency C        delivery jobs in flight in total, split across processes (default 50)
  --fanout-concurrency C event jobs in flight in total, split across processes (default: C)
  --processes P          worker processes (default 1)
  --provider-url URL     where each delivery is POSTed; "{channel}" in it is replaced (required)
  --redis URL            Redis URL (default redis://127.0.0.1:6379)
  --queue-prefix X       BullMQ key prefix; X:events:* and X:deliveries:* are cleared (default bench-bullmq)
  --rate R               enqueue events at R per second instead of all at once (default 0 = burst)
  --enqueue-batch N      events per addBulk call when enqueuing (default 500)
  --seed S               workload seed (default 1)
  --timeout SECONDS      give up after this long (default 600)
  --workload FILE        events from FILE (JSON {"events": [{"type", "data", "deliveries": [[user, channel]]}]})
                         instead of generated ones; --events etc. are then ignored
  --pg-url URL           track every delivery in PostgreSQL at URL (schema.sql is applied first)
  --pg-pool N            PostgreSQL connections per worker process (default 8)
  --pg-batch N           status updates per group commit at most (default 500)`;

function parseOptions(argv) {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        events: { type: 'string', default: '2000' },
        'recipients-min': { type: 'string', default: '1' },
        'recipients-max': { type: 'string', default: '5' },
        channels: { type: 'string', default: 'push,email,in_app' },
        'channels-min': { type: 'string', default: '1' },
        'channels-max': { type: 'string' },
        users: { type: 'string', default: '10000' },
        concurrency: { type: 'string', default: '50' },
        'fanout-concurrency': { type: 'string' },
        processes: { type: 'string', default: '1' },
        'provider-url': { type: 'string' },
        redis: { type: 'string', default: 'redis://127.0.0.1:6379' },
        'queue-prefix': { type: 'string', default: 'bench-bullmq' },
        rate: { type: 'string', default: '0' },
        'enqueue-batch': { type: 'string', default: '500' },
        seed: { type: 'string', default: '1' },
        timeout: { type: 'string', default: '600' },
        workload: { type: 'string' },
        'pg-url': { type: 'string' },
        'pg-pool': { type: 'string', default: '8' },
        'pg-batch': { type: 'string', default: '500' },
        help: { type: 'boolean', short: 'h', default: false },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (err) {
    die(`${err.message}\n${USAGE}`);
  }
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    process.exit(0);
  }
  const int = (name, min) => {
    const raw = values[name];
    const n = Number(raw);
    if (!Number.isInteger(n) || n < min) die(`--${name} must be an integer >= ${min} (got ${raw})`);
    return n;
  };
  const channels = values.channels.split(',').map((c) => c.trim()).filter(Boolean);
  if (channels.length === 0) die('--channels must name at least one channel');
  if (values['channels-max'] === undefined) values['channels-max'] = String(channels.length);
  const opts = {
    events: int('events', 1),
    recipientsMin: int('recipients-min', 1),
    recipientsMax: int('recipients-max', 1),
    channels,
    channelsMin: int('channels-min', 1),
    channelsMax: int('channels-max', 1),
    users: int('users', 1),
    concurrency: int('concurrency', 1),
    processes: int('processes', 1),
    redis: values.redis,
    prefix: values['queue-prefix'],
    rate: Number(values.rate),
    enqueueBatch: int('enqueue-batch', 1),
    seed: int('seed', 0),
    timeout: Number(values.timeout),
    workload: values.workload,
    pgUrl: values['pg-url'],
    pgPool: int('pg-pool', 1),
    pgBatch: int('pg-batch', 1),
  };
  if (values['fanout-concurrency'] === undefined) values['fanout-concurrency'] = String(opts.concurrency);
  opts.fanoutConcurrency = int('fanout-concurrency', 1);
  if (!values['provider-url']) die(`--provider-url is required\n${USAGE}`);
  opts.providerUrl = values['provider-url'];
  try {
    new URL(opts.providerUrl.replaceAll('{channel}', 'x'));
  } catch {
    die(`--provider-url is not a URL: ${opts.providerUrl}`);
  }
  if (opts.recipientsMax < opts.recipientsMin) die('--recipients-max must be >= --recipients-min');
  if (opts.recipientsMax > opts.users) die('--recipients-max must be <= --users');
  if (opts.channelsMax < opts.channelsMin) die('--channels-max must be >= --channels-min');
  if (opts.channelsMax > channels.length) die('--channels-max must be <= the number of --channels');
  if (opts.concurrency < opts.processes || opts.fanoutConcurrency < opts.processes) {
    die('--concurrency and --fanout-concurrency must be >= --processes (they are split across processes)');
  }
  if (!(opts.rate >= 0)) die('--rate must be >= 0');
  if (!(opts.timeout > 0)) die('--timeout must be > 0');
  if (!/^[A-Za-z0-9_.-]+$/.test(opts.prefix)) die('--queue-prefix may use only letters, digits, _ . -');
  return opts;
}

// ---------------------------------------------------------------------------------------------
// shared helpers

// Connection options for BullMQ. Workers need maxRetriesPerRequest: null (BullMQ requires it
// for blocking connections); the coordinator has already checked that Redis answers.
function bullConnection(redisUrl) {
  return { url: redisUrl, maxRetriesPerRequest: null };
}

// mulberry32: small, fast, seedable PRNG so a seed always yields the same workload.
function prng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function share(total, parts, index) {
  return Math.floor(total / parts) + (index < total % parts ? 1 : 0);
}

// Durable delivery tracking (--pg-url): what a team moving off BullMQ would need beside it.

// The fan-out's one statement per event: a status row per (event, user, channel), before any
// delivery job exists. A repeated fan-out (a retried or stalled event job) finds its rows there.
const INSERT_ROWS = `INSERT INTO deliveries (event_id, event_type, user_id, channel, status)
  SELECT $1, $2, u.user_id, u.channel, 'queued' FROM unnest($3::text[], $4::text[]) AS u(user_id, channel)
  ON CONFLICT (event_id, user_id, channel) DO NOTHING`;

// A group commit's one statement: the outcome of every delivery finished since the last one.
const RECORD_OUTCOMES = `UPDATE deliveries d SET status = u.status, provider_message_id = u.pid,
    provider_reply = u.reply, http_status = u.code, attempts = d.attempts + 1,
    sent_at = CASE WHEN u.status = 'sent' THEN now() END, updated_at = now()
  FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int[])
    AS u(event_id, user_id, channel, status, pid, reply, code)
  WHERE d.event_id = u.event_id AND d.user_id = u.user_id AND d.channel = u.channel`;

// Group commit: a delivery job waits until its outcome is in PostgreSQL, so a completed job always
// has its row. One UPDATE is in flight at a time; the outcomes that arrive meanwhile go together in
// the next one (at most `batch`), so a quiet worker writes each at once and a busy one batches.
class OutcomeWriter {
  constructor(pool, batch) {
    this.pool = pool;
    this.batch = batch;
    this.pending = [];
    this.flushing = false;
    this.flushes = 0;
  }

  record(outcome) {
    return new Promise((resolve, reject) => {
      this.pending.push({ outcome, resolve, reject });
      this.kick();
    });
  }

  kick() {
    if (this.flushing || this.pending.length === 0) return;
    this.flushing = true;
    const batch = this.pending.splice(0, this.batch);
    this.flush(batch).finally(() => {
      this.flushing = false;
      this.kick();
    });
  }

  async flush(batch) {
    const columns = [[], [], [], [], [], [], []];
    for (const { outcome: o } of batch) {
      const values = [o.eventId, o.userId, o.channel, o.status, o.providerId, o.reply, o.code];
      values.forEach((v, i) => columns[i].push(v));
    }
    try {
      const result = await this.pool.query(RECORD_OUTCOMES, columns);
      this.flushes += 1;
      if (result.rowCount !== batch.length) {
        throw new Error(`recorded ${result.rowCount} of ${batch.length} outcomes: status rows are missing`);
      }
      for (const item of batch) item.resolve();
    } catch (err) {
      for (const item of batch) item.reject(err);
    }
  }
}

async function openPool(url, size) {
  // Connections open before the clock starts, and stay open (no idle timeout) as a service's would.
  const pool = new pg.Pool({ connectionString: url, max: size, idleTimeoutMillis: 0 });
  const clients = await Promise.all(Array.from({ length: size }, () => pool.connect()));
  for (const client of clients) client.release();
  return pool;
}

// ---------------------------------------------------------------------------------------------
// worker process

async function workerMain(config) {
  const send = (msg, callback) => process.send(msg, callback);
  const { index, processes, prefix, redis, providerUrl } = config;
  const concurrency = share(config.concurrency, processes, index);
  const fanoutConcurrency = share(config.fanoutConcurrency, processes, index);
  const connection = bullConnection(redis);
  const jobDefaults = { removeOnComplete: true, removeOnFail: { count: 1000 }, attempts: 1 };
  const db = config.pgUrl ? await openPool(config.pgUrl, config.pgPool) : null;
  const outcomes = db ? new OutcomeWriter(db, config.pgBatch) : null;

  // One keep-alive pool per provider origin, as many sockets as delivery jobs in flight.
  const pools = new Map();
  const poolFor = (origin) => {
    let pool = pools.get(origin);
    if (!pool) {
      pool = new Pool(origin, { connections: concurrency, pipelining: 1, keepAliveTimeout: 60_000 });
      pools.set(origin, pool);
    }
    return pool;
  };
  const targets = new Map(); // channel -> { pool, path }
  const targetFor = (channel) => {
    let target = targets.get(channel);
    if (!target) {
      const url = new URL(providerUrl.replaceAll('{channel}', encodeURIComponent(channel)));
      target = { pool: poolFor(url.origin), path: `${url.pathname}${url.search}` };
      targets.set(channel, target);
    }
    return target;
  };

  const deliveriesQueue = new Queue('deliveries', { connection, prefix, defaultJobOptions: jobDefaults });

  // Fan-out: one deliveries job per (recipient, channel), added with one addBulk per event (after
  // the event's status rows, when tracking). Job ids are deterministic so a re-run fan-out does
  // not duplicate deliveries (while the earlier job still exists).
  const eventsWorker = new Worker(
    'events',
    async (job) => {
      const e = job.data;
      if (db) {
        const users = e.deliveries.map(([userId]) => userId);
        const channels = e.deliveries.map(([, channel]) => channel);
        await db.query(INSERT_ROWS, [e.event_id, e.event_type, users, channels]);
      }
      const jobs = e.deliveries.map(([userId, channel]) => ({
        name: 'deliver',
        data: {
          event_id: e.event_id,
          event_type: e.event_type,
          user_id: userId,
          channel,
          data: e.data,
          enqueued_at: e.enqueued_at,
        },
        opts: { jobId: `${e.event_id}-${userId}-${channel}` },
      }));
      await deliveriesQueue.addBulk(jobs);
      return jobs.length;
    },
    { connection, prefix, concurrency: fanoutConcurrency },
  );

  const latencies = [];
  let lastAckAt = 0;
  const deliveriesWorker = new Worker(
    'deliveries',
    async (job) => {
      const d = job.data;
      const { pool, path } = targetFor(d.channel);
      const res = await pool.request({
        method: 'POST',
        path,
        headers: { 'content-type': 'application/json', 'idempotency-key': job.id },
        body: JSON.stringify({
          event_id: d.event_id,
          event_type: d.event_type,
          user_id: d.user_id,
          channel: d.channel,
          idempotency_key: job.id,
          data: d.data,
        }),
      });
      const text = await res.body.text();
      const ok = res.statusCode >= 200 && res.statusCode < 300;
      const ackAt = now();
      if (outcomes) {
        let providerId = null;
        try {
          providerId = ok ? (JSON.parse(text).id ?? null) : null;
        } catch {
          // a reply that is not JSON keeps no id; the reply itself is recorded below
        }
        await outcomes.record({
          eventId: d.event_id,
          userId: d.user_id,
          channel: d.channel,
          status: ok ? 'sent' : 'failed',
          providerId: providerId === null ? null : String(providerId),
          reply: text.slice(0, 500),
          code: res.statusCode,
        });
      }
      if (!ok) throw new Error(`provider answered ${res.statusCode}: ${text.slice(0, 200)}`);
      latencies.push(ackAt - d.enqueued_at);
      return undefined;
    },
    { connection, prefix, concurrency },
  );

  let done = 0;
  let failed = 0;
  let eventsFailed = 0;
  const errors = [];
  const noteError = (what, err) => {
    if (errors.length < 5) errors.push(`${what}: ${err?.message ?? err}`);
  };
  deliveriesWorker.on('completed', () => {
    done += 1;
    lastAckAt = now(); // the job is completed in Redis: the last of these ends the timing
  });
  deliveriesWorker.on('failed', (job, err) => {
    failed += 1;
    lastAckAt = now();
    noteError(`delivery ${job?.id}`, err);
  });
  eventsWorker.on('failed', (job, err) => {
    eventsFailed += 1;
    noteError(`event ${job?.id}`, err);
  });
  for (const w of [eventsWorker, deliveriesWorker]) w.on('error', (err) => noteError('worker', err));

  let reported = '';
  const report = () => {
    const key = `${done}/${failed}/${eventsFailed}`;
    if (key !== reported) {
      reported = key;
      send({ t: 'progress', index, done, failed, eventsFailed, errors });
    }
  };
  const ticker = setInterval(report, 25);

  let cpuAtStart;
  process.on('message', async (msg) => {
    if (msg?.t === 'start') cpuAtStart = process.cpuUsage();
    if (msg?.t !== 'finish') return;
    clearInterval(ticker);
    const cpu = process.cpuUsage(cpuAtStart);
    const cpuSeconds = (cpu.user + cpu.system) / 1e6;
    await Promise.allSettled([eventsWorker.close(), deliveriesWorker.close(), deliveriesQueue.close()]);
    await Promise.allSettled([...pools.values()].map((p) => p.close()));
    if (db) await db.end().catch(() => {});
    const flushes = outcomes?.flushes ?? 0;
    send({ t: 'result', index, done, failed, eventsFailed, errors, lastAckAt, latencies, cpuSeconds, flushes }, () => {
      process.disconnect();
    });
  });
  process.on('disconnect', () => process.exit(0));

  await Promise.all([eventsWorker.waitUntilReady(), deliveriesWorker.waitUntilReady(), deliveriesQueue.waitUntilReady()]);
  send({ t: 'ready', index });
}

// ---------------------------------------------------------------------------------------------
// coordinator

function withTimeout(promise, ms, message) {
  let timer;
  const timeout = new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(message)), ms); });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function checkRedis(url) {
  const client = new IORedis(url, {
    lazyConnect: true,
    connectTimeout: 3000,
    maxRetriesPerRequest: 0,
    enableOfflineQueue: false,
    retryStrategy: () => null,
  });
  let cause = null;
  client.on('error', (err) => { cause ??= err; }); // the socket error is more telling than connect()'s
  try {
    await client.connect();
    const info = await withTimeout(client.info('server'), 3000, 'no answer to INFO within 3 s');
    const version = /redis_version:([^\r\n]+)/.exec(info)?.[1];
    if (!version) throw new Error('the server did not answer like Redis');
    return { client, version };
  } catch (err) {
    client.disconnect();
    const why = (cause ?? err).message || (cause ?? err).code || String(cause ?? err);
    die(`cannot reach Redis at ${url} (${why.replace(/\.$/, '')}); start it (e.g. ` +
        'redis-server --daemonize yes --bind 127.0.0.1 --port 6379) or pass --redis URL');
  }
}

async function clearKeys(client, prefix) {
  let removed = 0;
  for (const queue of ['events', 'deliveries']) {
    let cursor = '0';
    do {
      const [next, keys] = await client.scan(cursor, 'MATCH', `${prefix}:${queue}:*`, 'COUNT', 1000);
      cursor = next;
      if (keys.length) removed += await client.unlink(...keys);
    } while (cursor !== '0');
  }
  return removed;
}

function makeWorkload(opts) {
  const rand = prng(opts.seed);
  const pick = (lo, hi) => lo + Math.floor(rand() * (hi - lo + 1));
  const events = [];
  let deliveries = 0;
  for (let i = 0; i < opts.events; i += 1) {
    const recipients = new Set();
    const nr = pick(opts.recipientsMin, opts.recipientsMax);
    while (recipients.size < nr) recipients.add(`user-${pick(1, opts.users)}`);
    const pool = [...opts.channels];
    const channels = [];
    const nc = pick(opts.channelsMin, opts.channelsMax);
    while (channels.length < nc) channels.push(pool.splice(pick(0, pool.length - 1), 1)[0]);
    const eventType = EVENT_TYPES[pick(0, EVENT_TYPES.length - 1)];
    events.push({
      event_id: `${opts.runId}-e${i}`,
      event_type: eventType,
      deliveries: [...recipients].flatMap((userId) => channels.map((channel) => [userId, channel])),
      data: { title: `${eventType} #${i}`, url: `/things/${i}` },
    });
    deliveries += recipients.size * channels.length;
  }
  return { events, deliveries };
}

// --workload FILE: the events another system planned (the bench passes what notifier queued), each
// with its (user, channel) pairs.
function loadWorkload(opts) {
  let parsed;
  try {
    parsed = JSON.parse(readFileSync(opts.workload, 'utf8'));
  } catch (err) {
    die(`cannot read --workload ${opts.workload}: ${err.message}`);
  }
  const events = [];
  let deliveries = 0;
  for (const [i, e] of (parsed.events ?? []).entries()) {
    const pairs = [...new Map((e.deliveries ?? []).map(([u, c]) => [`${u}\u0000${c}`, [String(u), String(c)]])).values()];
    if (pairs.length === 0) continue; // nothing to deliver (all suppressed or deferred)
    events.push({ event_id: `${opts.runId}-e${i}`, event_type: String(e.type), deliveries: pairs, data: e.data ?? {} });
    deliveries += pairs.length;
  }
  if (events.length === 0) die(`--workload ${opts.workload} has no event with a delivery`);
  return { events, deliveries };
}

// --pg-url: apply schema.sql (idempotent) and keep the connection for the final check.
async function checkPostgres(url) {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 5000 });
  try {
    await client.connect();
    await client.query(readFileSync(SCHEMA, 'utf8'));
    return client;
  } catch (err) {
    await client.end().catch(() => {});
    die(`cannot use PostgreSQL at ${url.replace(/\/\/[^@/]*@/, '//')} (${err.message})`);
  }
}

function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  const rank = Math.max(1, Math.ceil((p / 100) * sorted.length));
  return sorted[Math.min(rank, sorted.length) - 1];
}

const round = (x, digits = 1) => (x === null ? null : Number(x.toFixed(digits)));

async function coordinatorMain(opts) {
  const { client, version: redisVersion } = await checkRedis(opts.redis);
  // Ids (and so idempotency keys) are unique per run, so a provider that dedupes by key never
  // mistakes a second run for replays; the workload's shape still comes from --seed alone.
  opts.runId = `r${randomBytes(4).toString('hex')}`;
  await clearKeys(client, opts.prefix);
  const { events, deliveries: expected } = opts.workload ? loadWorkload(opts) : makeWorkload(opts);
  opts.events = events.length;
  const tracking = opts.pgUrl ? await checkPostgres(opts.pgUrl) : null;

  const children = [];
  const progress = new Map();
  const results = new Map();
  let fatal = null;
  let readyCount = 0;
  let onReady;
  let onAllDone;
  let onResults;
  const ready = new Promise((resolve) => { onReady = resolve; });
  const allDone = new Promise((resolve) => { onAllDone = resolve; });
  const allResults = new Promise((resolve) => { onResults = resolve; });
  let finishing = false;

  const fail = (message) => {
    if (fatal) return;
    fatal = message;
    onReady();
    onAllDone();
    onResults();
  };

  const config = {
    processes: opts.processes,
    prefix: opts.prefix,
    redis: opts.redis,
    providerUrl: opts.providerUrl,
    concurrency: opts.concurrency,
    fanoutConcurrency: opts.fanoutConcurrency,
    pgUrl: opts.pgUrl,
    pgPool: opts.pgPool,
    pgBatch: opts.pgBatch,
  };
  for (let index = 0; index < opts.processes; index += 1) {
    const child = fork(SELF, ['--role=worker'], {
      env: { ...process.env, BENCH_BULLMQ_WORKER: JSON.stringify({ ...config, index }) },
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    });
    children.push(child);
    child.on('message', (msg) => {
      if (msg.t === 'ready') {
        readyCount += 1;
        if (readyCount === opts.processes) onReady();
      } else if (msg.t === 'progress') {
        progress.set(msg.index, msg);
        let done = 0;
        let failed = 0;
        let eventsFailed = 0;
        for (const p of progress.values()) {
          done += p.done;
          failed += p.failed;
          eventsFailed += p.eventsFailed;
        }
        if (eventsFailed > 0) fail(`an event (fan-out) job failed: ${msg.errors.join('; ')}`);
        else if (done + failed >= expected) onAllDone();
      } else if (msg.t === 'result') {
        results.set(msg.index, msg);
        if (results.size === opts.processes) onResults();
      }
    });
    child.on('exit', (code, signal) => {
      if (!finishing || !results.has(index)) {
        fail(`worker process ${index} exited early (code ${code}, signal ${signal})`);
      }
    });
  }

  const timer = setTimeout(() => {
    const done = [...progress.values()].reduce((s, p) => s + p.done + p.failed, 0);
    fail(`timed out after ${opts.timeout}s with ${done}/${expected} deliveries finished`);
  }, opts.timeout * 1000);
  timer.unref();

  const shutdown = async () => {
    finishing = true;
    for (const child of children) if (child.connected) child.send({ t: 'finish' });
    const exited = Promise.all(children.map((c) => (c.exitCode !== null || c.signalCode !== null
      ? null : new Promise((r) => c.once('exit', r)))));
    await Promise.race([Promise.all([allResults, exited]), new Promise((r) => setTimeout(r, 10_000).unref())]);
    for (const child of children) if (child.exitCode === null && child.signalCode === null) child.kill();
    await clearKeys(client, opts.prefix).catch(() => {});
    client.disconnect();
  };
  for (const [signal, code] of [['SIGINT', 130], ['SIGTERM', 143]]) {
    process.on(signal, async () => {
      for (const child of children) child.kill();
      await withTimeout(clearKeys(client, opts.prefix), 2000, 'timeout').catch(() => {});
      process.exit(code);
    });
  }

  await ready;
  if (fatal) {
    await shutdown();
    die(fatal, 1);
  }

  const eventsQueue = new Queue('events', {
    connection: bullConnection(opts.redis),
    prefix: opts.prefix,
    defaultJobOptions: { removeOnComplete: true, removeOnFail: { count: 1000 }, attempts: 1 },
  });
  await eventsQueue.waitUntilReady();

  const redisCpu = async () => {
    const info = await client.info('cpu');
    const field = (name) => Number(new RegExp(`${name}:([0-9.]+)`).exec(info)?.[1] ?? NaN);
    return field('used_cpu_user') + field('used_cpu_sys');
  };
  const redisCpuAtStart = await redisCpu();
  for (const child of children) child.send({ t: 'start' });
  const toJob = (e, at) => ({ name: 'event', data: { ...e, enqueued_at: at }, opts: { jobId: e.event_id } });
  const start = now();
  let enqueueEnd;
  if (opts.rate > 0) {
    // Open loop: at every tick enqueue however many events are due by now.
    let sent = 0;
    while (sent < events.length && !fatal) {
      const due = Math.min(events.length, Math.floor(((now() - start) / 1000) * opts.rate) + 1);
      while (sent < due) {
        const at = now();
        const batch = events.slice(sent, Math.min(due, sent + opts.enqueueBatch));
        await eventsQueue.addBulk(batch.map((e) => toJob(e, at)));
        sent += batch.length;
      }
      if (sent < events.length) await new Promise((r) => setTimeout(r, 5));
    }
  } else {
    for (let i = 0; i < events.length && !fatal; i += opts.enqueueBatch) {
      const at = now();
      await eventsQueue.addBulk(events.slice(i, i + opts.enqueueBatch).map((e) => toJob(e, at)));
    }
  }
  enqueueEnd = now();

  await allDone;
  const redisCpuSeconds = (await redisCpu()) - redisCpuAtStart;
  await eventsQueue.close();
  await shutdown();
  if (fatal) die(fatal, 1);

  let done = 0;
  let failed = 0;
  let lastAckAt = 0;
  let workerCpuSeconds = 0;
  let flushes = 0;
  const errors = [];
  const all = [];
  for (const r of results.values()) {
    done += r.done;
    failed += r.failed;
    lastAckAt = Math.max(lastAckAt, r.lastAckAt);
    workerCpuSeconds += r.cpuSeconds;
    flushes += r.flushes;
    errors.push(...r.errors);
    for (const x of r.latencies) all.push(x);
  }
  // After the clock: what the status rows say (this run's events only).
  let tracked = null;
  if (tracking) {
    const rows = await tracking.query(
      'SELECT status, count(*)::int AS n FROM deliveries WHERE event_id LIKE $1 GROUP BY status',
      [`${opts.runId}-%`],
    );
    tracked = Object.fromEntries(rows.rows.map((r) => [r.status, r.n]));
    await tracking.end();
  }
  const sorted = Float64Array.from(all).sort();
  const seconds = (lastAckAt - start) / 1000;
  const out = {
    events: opts.events,
    deliveries: done,
    failed,
    seconds: round(seconds, 3),
    deliveries_per_s: round(done / seconds),
    events_per_s: round(opts.events / seconds),
    p50_ms: round(percentile(sorted, 50)),
    p95_ms: round(percentile(sorted, 95)),
    p99_ms: round(percentile(sorted, 99)),
    max_ms: round(sorted.length ? sorted[sorted.length - 1] : null),
    concurrency: opts.concurrency,
    fanout_concurrency: opts.fanoutConcurrency,
    processes: opts.processes,
    rate: opts.rate,
    enqueue_seconds: round((enqueueEnd - start) / 1000, 3),
    worker_cpu_s: round(workerCpuSeconds, 2),
    redis_cpu_s: round(redisCpuSeconds, 2),
    tracked,
    pg_flushes: tracking ? flushes : null,
    // Transactions that are not the workload's, to leave out of a per-delivery count: PostgreSQL
    // counts one per backend start-up (the coordinator's connection and every pooled one), plus the
    // coordinator's schema and final check.
    pg_own_xacts: tracking ? 3 + opts.processes * opts.pgPool : null,
    pg_pool: tracking ? opts.pgPool : null,
    seed: opts.seed,
    run_id: opts.runId,
    bullmq: BULLMQ_VERSION,
    node: process.versions.node,
    redis: redisVersion,
  };
  process.stdout.write(`${JSON.stringify(out)}\n`);
  if (failed > 0 || done !== expected) {
    die(`${failed} of ${expected} deliveries failed (first errors: ${errors.join('; ') || 'none recorded'})`, 1);
  }
  if (tracked && (tracked.sent ?? 0) !== done) {
    die(`${done} deliveries completed but ${tracked.sent ?? 0} status rows say sent: ${JSON.stringify(tracked)}`, 1);
  }
}

// ---------------------------------------------------------------------------------------------

if (process.argv.includes('--role=worker')) {
  const raw = process.env.BENCH_BULLMQ_WORKER;
  if (!raw || !process.send) die('--role=worker is internal: run.mjs starts its own workers');
  workerMain(JSON.parse(raw)).catch((err) => die(`worker failed: ${err.stack || err}`, 1));
} else {
  coordinatorMain(parseOptions(process.argv.slice(2))).catch((err) => die(err.stack || String(err), 1));
}
