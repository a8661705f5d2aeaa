// Shared by the Node roles of handoff-bench: argument parsing, the messages (identical to
// bench/src/payload.rs), result lines, and starting a child with an IPC channel.
'use strict'
const { spawn } = require('child_process')

// `role --key value --flag -- child command...` -> { role, opts, child }
function parseArgs (argv) {
  const dash = argv.indexOf('--')
  const own = dash === -1 ? argv : argv.slice(0, dash)
  const child = dash === -1 ? [] : argv.slice(dash + 1)
  const opts = {}
  const role = own[0]
  for (let i = 1; i < own.length; i++) {
    const key = own[i].replace(/^--/, '')
    const next = own[i + 1]
    if (next === undefined || next.startsWith('--')) {
      opts[key] = true
    } else {
      opts[key] = next
      i++
    }
  }
  return { role, opts, child }
}

const PAD = 'x'.repeat(39)

// The i-th message of `size` bytes of JSON: a 64-byte object, or a string.
function messageMaker (size) {
  if (size === 64) return (i) => ({ seq: 10000000 + (i % 90000000), pad: PAD })
  const body = 'x'.repeat(size - 2)
  return () => body
}

function emit (role, value) {
  process.stdout.write('BENCH ' + JSON.stringify(Object.assign({ role }, value)) + '\n')
}

// Starts `cmd` with the channel on fd 3, as the brief's spawn(path, args, {stdio: [0,1,2,'ipc']}).
function startChild (cmd) {
  if (cmd.length === 0) throw new Error('no child command after --')
  const child = spawn(cmd[0], cmd.slice(1), { stdio: [0, 1, 2, 'ipc'] })
  child.on('error', (e) => { console.error('node role: child:', e.message); process.exit(1) })
  return child
}

// Exit when orphaned (the orchestrator or our parent died), so nothing keeps listening.
function dieWithParent () {
  const parent = process.ppid
  setInterval(() => { if (process.ppid !== parent) process.exit(3) }, 250).unref()
}

function nowUs () {
  return Number(process.hrtime.bigint()) / 1000
}

function percentile (sorted, p) {
  if (sorted.length === 0) return NaN
  const rank = Math.round((p / 100) * (sorted.length - 1))
  return sorted[Math.min(rank, sorted.length - 1)]
}

module.exports = { parseArgs, messageMaker, emit, startChild, dieWithParent, nowUs, percentile }
