// A minimal event emitter (works the same in browsers and Node).

export class Emitter {
  constructor() {
    this._listeners = new Map();
  }
  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return this;
  }
  off(type, fn) {
    this._listeners.get(type)?.delete(fn);
    return this;
  }
  once(type, fn) {
    const w = (...a) => {
      this.off(type, w);
      fn(...a);
    };
    return this.on(type, w);
  }
  emit(type, detail) {
    for (const fn of [...(this._listeners.get(type) ?? [])]) {
      try {
        fn(detail);
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    }
  }
}
