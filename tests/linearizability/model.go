package main

// A model of etcd's key-value store for porcupine: a few keys, each with
// its value (a unique id), create and mod revisions and version, and the
// store's revision. Revisions in etcd and in a one-shard kubeshard are
// dense (strict mode: a write takes the next revision, a read's header is
// the current one); a sharded kubeshard hands out increasing, not dense,
// revisions across shards, and a read's header is its shard's counter
// (relaxed mode: writes take higher revisions, a read's header is at least
// the revision of every write before it).

import (
	"fmt"

	"github.com/anishathalye/porcupine"
)

// MaxKeys is the most keys a history may use (the state is an array, so
// that porcupine compares states with ==).
const MaxKeys = 8

type kv struct {
	Exists  bool
	Value   int64
	Mod     int64
	Create  int64
	Version int64
}

type state struct {
	Rev  int64
	Keys [MaxKeys]kv
}

type opKind int

const (
	opGet opKind = iota
	opPut
	opDelete
	opCas
)

type input struct {
	Kind  opKind
	Key   int
	Value int64 // put and cas: the unique id written
	Mod   int64 // cas: the mod revision compared (0: absent)
}

type output struct {
	Rev       int64 // header revision (writes: the write's revision)
	Found     kv    // get, and a failed cas
	Deleted   int64 // delete
	Succeeded bool  // cas
}

func (k kv) String() string {
	if !k.Exists {
		return "absent"
	}
	return fmt.Sprintf("v%d@%d(c%d,v%d)", k.Value, k.Mod, k.Create, k.Version)
}

func put(s state, key int, value int64, rev int64) state {
	old := s.Keys[key]
	next := kv{Exists: true, Value: value, Mod: rev, Create: rev, Version: 1}
	if old.Exists {
		next.Create = old.Create
		next.Version = old.Version + 1
	}
	s.Keys[key] = next
	s.Rev = rev
	return s
}

// newModel gives the model; strict: revisions are dense (see above).
func newModel(start int64, strict bool) porcupine.Model {
	writeRev := func(s state, rev int64) bool {
		if strict {
			return rev == s.Rev+1
		}
		return rev > s.Rev
	}
	readRev := func(s state, rev int64, found kv) bool {
		if strict {
			return rev == s.Rev
		}
		// At least every write before it (a later write on another
		// shard may have a lower revision than the header).
		return rev >= s.Rev
	}
	return porcupine.Model{
		Init: func() interface{} { return state{Rev: start} },
		Step: func(st, in, out interface{}) (bool, interface{}) {
			s := st.(state)
			i := in.(input)
			o := out.(output)
			cur := s.Keys[i.Key]
			// Relaxed: a header promises that every later write takes a
			// higher revision, as etcd's does.
			seen := func(s state) state {
				if !strict && o.Rev > s.Rev {
					s.Rev = o.Rev
				}
				return s
			}
			switch i.Kind {
			case opGet:
				return o.Found == cur && readRev(s, o.Rev, cur), seen(s)
			case opPut:
				if !writeRev(s, o.Rev) {
					return false, s
				}
				return true, put(s, i.Key, i.Value, o.Rev)
			case opDelete:
				if o.Deleted == 0 {
					return !cur.Exists && readRev(s, o.Rev, cur), seen(s)
				}
				if !cur.Exists || !writeRev(s, o.Rev) {
					return false, s
				}
				s.Keys[i.Key] = kv{}
				s.Rev = o.Rev
				return true, s
			case opCas:
				matches := cur.Mod == i.Mod
				if !cur.Exists {
					matches = i.Mod == 0
				}
				if o.Succeeded {
					if !matches || !writeRev(s, o.Rev) {
						return false, s
					}
					return true, put(s, i.Key, i.Value, o.Rev)
				}
				return !matches && o.Found == cur && readRev(s, o.Rev, cur), seen(s)
			}
			return false, s
		},
		Equal: func(a, b interface{}) bool { return a.(state) == b.(state) },
		DescribeOperation: func(in, out interface{}) string {
			i := in.(input)
			o := out.(output)
			switch i.Kind {
			case opGet:
				return fmt.Sprintf("get(k%d) -> %v @%d", i.Key, o.Found, o.Rev)
			case opPut:
				return fmt.Sprintf("put(k%d, v%d) -> @%d", i.Key, i.Value, o.Rev)
			case opDelete:
				return fmt.Sprintf("delete(k%d) -> %d @%d", i.Key, o.Deleted, o.Rev)
			default:
				return fmt.Sprintf("cas(k%d, mod=%d, v%d) -> %t %v @%d", i.Key, i.Mod, i.Value, o.Succeeded, o.Found, o.Rev)
			}
		},
		DescribeState: func(st interface{}) string {
			s := st.(state)
			return fmt.Sprintf("rev %d %v", s.Rev, s.Keys)
		},
	}
}
