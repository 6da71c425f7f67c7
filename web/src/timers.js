// Timers that keep running in hidden tabs (web/README.md, "Keepalive in hidden tabs").
//
// Browsers throttle main-thread timers of hidden pages (to one wake-up per second at
// once, and in Chromium to one per minute after some minutes: "intensive throttling").
// A dedicated Worker's timers are not throttled, so the keepalive timers run in a tiny
// Worker built from a Blob URL that posts a message back when a timer fires. Where no
// Worker can be made (Node, a CSP that forbids blob: workers) the main-thread setTimeout
// is used instead; if the Worker fails later, pending timers are re-armed on the main
// thread.

const WORKER_SOURCE =
  'const t=new Map();onmessage=e=>{const[o,i,ms]=e.data;' +
  'if(o===1){t.set(i,setTimeout(()=>{t.delete(i);postMessage(i)},ms))}' +
  'else{clearTimeout(t.get(i));t.delete(i)}}';

class MainTimers {
  constructor() {
    this.kind = 'main';
  }
  setTimeout(fn, ms) {
    return setTimeout(fn, ms);
  }
  clearTimeout(h) {
    clearTimeout(h);
  }
}

class WorkerTimers {
  constructor() {
    this.kind = 'worker';
    this.next = 1;
    this.pending = new Map(); // id -> {fn, due}
    this.fallback = null;
    const url = URL.createObjectURL(new Blob([WORKER_SOURCE], { type: 'text/javascript' }));
    this.worker = new Worker(url);
    URL.revokeObjectURL(url);
    this.worker.onmessage = (e) => {
      const p = this.pending.get(e.data);
      if (!p) return;
      this.pending.delete(e.data);
      p.fn();
    };
    this.worker.onerror = () => this._degrade();
  }
  _degrade() {
    if (this.fallback) return;
    this.kind = 'main (worker failed)';
    this.fallback = new MainTimers();
    try {
      this.worker.terminate();
    } catch {
      /* already gone */
    }
    const now = performance.now();
    for (const [id, p] of this.pending) {
      p.main = this.fallback.setTimeout(() => {
        if (this.pending.delete(id)) p.fn();
      }, Math.max(0, p.due - now));
    }
  }
  setTimeout(fn, ms) {
    const id = this.next++;
    const p = { fn, due: performance.now() + ms, main: null };
    this.pending.set(id, p);
    if (this.fallback) {
      p.main = this.fallback.setTimeout(() => {
        if (this.pending.delete(id)) fn();
      }, ms);
    } else {
      this.worker.postMessage([1, id, ms]);
    }
    return id;
  }
  clearTimeout(id) {
    const p = this.pending.get(id);
    if (!p) return;
    this.pending.delete(id);
    if (p.main !== null) this.fallback.clearTimeout(p.main);
    else if (!this.fallback) this.worker.postMessage([0, id]);
  }
}

let sharedTimers = null;

/**
 * The timer service: 'auto' (a Worker where possible, else main thread), 'worker' or
 * 'main'. Returns an object with setTimeout(fn, ms), clearTimeout(h) and `kind`.
 */
export function getTimers(mode = 'auto') {
  if (mode === 'main') return new MainTimers();
  if (sharedTimers) return sharedTimers;
  const canWorker = typeof Worker === 'function' && typeof Blob === 'function' && typeof URL?.createObjectURL === 'function';
  if (canWorker) {
    try {
      sharedTimers = new WorkerTimers();
      return sharedTimers;
    } catch {
      /* CSP or no Worker support: fall through */
    }
  }
  if (mode === 'worker') throw new Error('no Worker available for timers');
  sharedTimers = new MainTimers();
  return sharedTimers;
}
