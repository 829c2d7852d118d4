// Package storage runs the apiserver storage suite
// (k8s.io/apiserver/pkg/storage/testing, the exported RunTest* functions)
// against kube-apiserver's etcd3 store connected to a fresh server per test:
// kubeshard, or a real etcd for the reference counts.
package storage

import (
	"context"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/client/v3/kubernetes"

	"k8s.io/apimachinery/pkg/api/apitesting"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/apiserver/pkg/apis/example"
	examplev1 "k8s.io/apiserver/pkg/apis/example/v1"
	"k8s.io/apiserver/pkg/features"
	"k8s.io/apiserver/pkg/storage"
	"k8s.io/apiserver/pkg/storage/etcd3"
	storagetesting "k8s.io/apiserver/pkg/storage/testing"
	"k8s.io/apiserver/pkg/storage/value"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	featuregatetesting "k8s.io/component-base/featuregate/testing"
	"k8s.io/utils/clock"
)

var (
	scheme = runtime.NewScheme()
	codecs = serializer.NewCodecFactory(scheme)
)

// Stored values carry this prefix (the suite's PrefixTransformer).
const valuePrefix = "test!"

// The store's key prefix: kube-apiserver's default, so that the sharded
// target's topology routes the suite's pods like real ones.
const keyPrefix = "/registry"

// etcd3's page size cap, which the paging call counts depend on.
const maxLimit = 10000

func init() {
	metav1.AddToGroupVersion(scheme, metav1.SchemeGroupVersion)
	utilruntime.Must(example.AddToScheme(scheme))
	utilruntime.Must(examplev1.AddToScheme(scheme))
}

// switchableTransformer lets a test swap the store's value transformer
// while the store runs (the suite's UpdatePrefixTransformer hook): the
// store and its watcher both hold this one wrapper.
type switchableTransformer struct {
	mu    sync.RWMutex
	inner value.Transformer
}

func (s *switchableTransformer) get() value.Transformer {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.inner
}

func (s *switchableTransformer) set(t value.Transformer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.inner = t
}

func (s *switchableTransformer) TransformFromStorage(ctx context.Context, data []byte, dataCtx value.Context) ([]byte, bool, error) {
	return s.get().TransformFromStorage(ctx, data, dataCtx)
}

func (s *switchableTransformer) TransformToStorage(ctx context.Context, data []byte, dataCtx value.Context) ([]byte, error) {
	return s.get().TransformToStorage(ctx, data, dataCtx)
}

// compactRevisioner is the part of etcd3's store the compaction helper uses.
type compactRevisioner interface {
	CompactRevision() int64
}

// testStore is the etcd3 store with the hooks the suite asks for.
type testStore struct {
	storage.Interface
	compacted   compactRevisioner
	transformer *switchableTransformer
	prefix      *storagetesting.PrefixTransformer
	client      *kubernetes.Client
}

func (s *testStore) UpdatePrefixTransformer(modifier storagetesting.PrefixTransformerModifier) func() {
	original := s.transformer.get()
	copied := *s.prefix
	s.transformer.set(modifier(&copied))
	return func() { s.transformer.set(original) }
}

// setup starts a fresh server and builds the store the way kube-apiserver
// does (etcd3.New with a compactor, the example Pod codec and a value
// prefix transformer).
func setup(t *testing.T, opts serverOptions) (context.Context, *testStore) {
	t.Helper()
	client := startServer(t, opts)
	codec := apitesting.TestCodec(codecs, examplev1.SchemeGroupVersion)
	versioner := storage.APIObjectVersioner{}
	compactor := etcd3.NewCompactor(client.Client, 0, clock.RealClock{}, nil)
	t.Cleanup(compactor.Stop)
	prefix := storagetesting.NewPrefixTransformer([]byte(valuePrefix), false)
	transformer := &switchableTransformer{inner: prefix}
	leases := etcd3.NewDefaultLeaseManagerConfig()
	// The suite waits at most 30 s for a TTL; reuse leases for 1 s only.
	leases.ReuseDurationSeconds = 1
	store := etcd3.New(
		client,
		compactor,
		codec,
		func() runtime.Object { return &example.Pod{} },
		func() runtime.Object { return &example.PodList{} },
		keyPrefix,
		"/pods",
		schema.GroupResource{Resource: "pods"},
		transformer,
		leases,
		etcd3.NewDefaultDecoder(codec, versioner),
		versioner,
	)
	t.Cleanup(store.Close)
	return context.Background(), &testStore{
		Interface:   store,
		compacted:   store,
		transformer: transformer,
		prefix:      prefix,
		client:      client,
	}
}

// storedInvariants checks what kube-apiserver writes: the value under the
// key decodes (after the transformer's prefix) to the object without its
// resource version or self link.
func (s *testStore) storedInvariants() storagetesting.KeyValidation {
	codec := apitesting.TestCodec(codecs, examplev1.SchemeGroupVersion)
	return func(ctx context.Context, t *testing.T, key string) {
		got, err := s.client.KV.Get(ctx, keyPrefix+key)
		if err != nil {
			t.Fatalf("get %s: %v", key, err)
		}
		if len(got.Kvs) == 0 {
			t.Fatalf("no value stored under %s", keyPrefix+key)
		}
		value := got.Kvs[0].Value
		if len(value) < len(valuePrefix) || string(value[:len(valuePrefix)]) != valuePrefix {
			t.Fatalf("value under %s lacks the transformer prefix: %q", key, value)
		}
		decoded, err := runtime.Decode(codec, value[len(valuePrefix):])
		if err != nil {
			t.Fatalf("decode the value under %s: %v", key, err)
		}
		pod := decoded.(*example.Pod)
		if pod.ResourceVersion != "" {
			t.Errorf("stored object has resource version %q", pod.ResourceVersion)
		}
		if pod.SelfLink != "" {
			t.Errorf("stored object has self link %q", pod.SelfLink)
		}
	}
}

// compaction compacts the server at a resource version the way
// kube-apiserver's compactor does (etcd3.Compact: a Txn on its version key,
// then Compact), and waits until the store has seen it.
func (s *testStore) compaction() storagetesting.Compaction {
	return func(ctx context.Context, t *testing.T, resourceVersion string) {
		rv, err := storage.APIObjectVersioner{}.ParseResourceVersion(resourceVersion)
		if err != nil {
			t.Fatal(err)
		}
		var version int64
		version, _, _, err = etcd3.Compact(ctx, s.client.Client, version, int64(rv))
		if err != nil {
			_, _, _, err = etcd3.Compact(ctx, s.client.Client, version, int64(rv))
		}
		if err != nil {
			t.Fatalf("compact at %d: %v", rv, err)
		}
		if utilfeature.DefaultFeatureGate.Enabled(features.ListFromCacheSnapshot) {
			deadline := time.Now().Add(30 * time.Second)
			for s.compacted.CompactRevision() != int64(rv) {
				if time.Now().After(deadline) {
					t.Fatalf("the store did not see the compaction at %d", rv)
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
	}
}

// increaseRV writes a key outside the store's prefix: the store's next
// read must show a higher revision (one revision space across shards).
func (s *testStore) increaseRV() storagetesting.IncreaseRVFunc {
	return func(ctx context.Context, t *testing.T) {
		if _, err := s.client.KV.Put(ctx, "increaseRV", "ok"); err != nil {
			t.Fatalf("put increaseRV: %v", err)
		}
	}
}

// callsInvariants checks how many values were decoded and how many Range
// calls a paginated list made: kube-apiserver doubles the page size while
// pages come back short.
func (s *testStore) callsInvariants() storagetesting.CallsValidation {
	recorder := s.client.KV.(*storagetesting.KVRecorder)
	return func(t *testing.T, pageSize, estimatedProcessedObjects uint64) {
		if reads := s.prefix.GetReadsAndReset(); reads != estimatedProcessedObjects {
			t.Errorf("values read: %d, expected %d", reads, estimatedProcessedObjects)
		}
		calls := uint64(1)
		if pageSize != 0 {
			limit := pageSize
			for sum := uint64(1); sum < estimatedProcessedObjects; {
				limit *= 2
				if limit > maxLimit {
					limit = maxLimit
				}
				sum += limit
				calls++
			}
		}
		if reads := recorder.GetReadsAndReset(); reads != calls {
			t.Fatalf("range calls: %d, expected %d", reads, calls)
		}
	}
}

func (s *testStore) recorder() *storagetesting.KubernetesRecorder {
	return s.client.Kubernetes.(*storagetesting.KubernetesRecorder)
}

// ---- the store tests -------------------------------------------------------

func TestCreate(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestCreate(ctx, t, s, s.storedInvariants())
}

func TestCreateWithTTL(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestCreateWithTTL(ctx, t, s)
}

func TestCreateWithKeyExist(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestCreateWithKeyExist(ctx, t, s)
}

func TestGet(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestGet(ctx, t, s)
}

func TestUnconditionalDelete(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestUnconditionalDelete(ctx, t, s)
}

func TestConditionalDelete(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestConditionalDelete(ctx, t, s)
}

func TestDeleteWithSuggestion(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestDeleteWithSuggestion(ctx, t, s)
}

func TestDeleteWithSuggestionAndConflict(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestDeleteWithSuggestionAndConflict(ctx, t, s)
}

func TestDeleteWithSuggestionOfDeletedObject(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestDeleteWithSuggestionOfDeletedObject(ctx, t, s)
}

func TestValidateDeletionWithSuggestion(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestValidateDeletionWithSuggestion(ctx, t, s)
}

func TestValidateDeletionWithOnlySuggestionValid(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestValidateDeletionWithOnlySuggestionValid(ctx, t, s)
}

func TestDeleteWithConflict(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestDeleteWithConflict(ctx, t, s)
}

func TestPreconditionalDeleteWithSuggestion(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestPreconditionalDeleteWithSuggestion(ctx, t, s)
}

func TestPreconditionalDeleteWithOnlySuggestionPass(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestPreconditionalDeleteWithOnlySuggestionPass(ctx, t, s)
}

func TestListPaging(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestListPaging(ctx, t, s)
}

func TestGetListNonRecursive(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestGetListNonRecursive(ctx, t, s.increaseRV(), s)
}

func TestGetListRecursivePrefix(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestGetListRecursivePrefix(ctx, t, s)
}

func TestGuaranteedUpdate(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestGuaranteedUpdate(ctx, t, s, s.storedInvariants())
}

func TestGuaranteedUpdateWithTTL(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestGuaranteedUpdateWithTTL(ctx, t, s)
}

func TestGuaranteedUpdateChecksStoredData(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestGuaranteedUpdateChecksStoredData(ctx, t, s)
}

func TestGuaranteedUpdateWithConflict(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestGuaranteedUpdateWithConflict(ctx, t, s)
}

func TestGuaranteedUpdateWithSuggestionAndConflict(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestGuaranteedUpdateWithSuggestionAndConflict(ctx, t, s)
}

func TestTransformationFailure(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestTransformationFailure(ctx, t, s)
}

func TestList(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestList(ctx, t, s, s.compaction(), false, s.recorder())
}

func TestConsistentList(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestConsistentList(ctx, t, s, s.increaseRV(), false, true, false)
}

func TestCompactRevision(t *testing.T) {
	// The store follows the compaction key only with ListFromCacheSnapshot.
	featuregatetesting.SetFeatureGateDuringTest(t, utilfeature.DefaultFeatureGate, features.ListFromCacheSnapshot, true)
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestCompactRevision(ctx, t, s, s.increaseRV(), s.compaction())
}

func TestListContinuation(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestListContinuation(ctx, t, s, s.callsInvariants())
}

func TestListPaginationRareObject(t *testing.T) {
	// With ListFromCacheSnapshot the store makes one more Get (of the
	// compaction key), which the call count does not expect.
	featuregatetesting.SetFeatureGateDuringTest(t, utilfeature.DefaultFeatureGate, features.ListFromCacheSnapshot, false)
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestListPaginationRareObject(ctx, t, s, s.callsInvariants())
}

func TestListContinuationWithFilter(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestListContinuationWithFilter(ctx, t, s, s.callsInvariants())
}

func TestNamespaceScopedList(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestNamespaceScopedList(ctx, t, s)
}

func TestListInconsistentContinuation(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestListInconsistentContinuation(ctx, t, s, s.compaction())
}

func TestListResourceVersionMatch(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestListResourceVersionMatch(ctx, t, s)
}

// ---- the watch tests -------------------------------------------------------

func TestWatch(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestWatch(ctx, t, s)
}

func TestClusterScopedWatch(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestClusterScopedWatch(ctx, t, s)
}

func TestNamespaceScopedWatch(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestNamespaceScopedWatch(ctx, t, s)
}

func TestDeleteTriggerWatch(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestDeleteTriggerWatch(ctx, t, s)
}

func TestWatchFromZero(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestWatchFromZero(ctx, t, s, s.compaction())
}

func TestWatchFromNonZero(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestWatchFromNonZero(ctx, t, s)
}

func TestDelayedWatchDelivery(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestDelayedWatchDelivery(ctx, t, s)
}

func TestWatchError(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestWatchError(ctx, t, s)
}

func TestWatchContextCancel(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestWatchContextCancel(ctx, t, s)
}

func TestWatcherTimeout(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestWatcherTimeout(ctx, t, s)
}

func TestWatchDeleteEventObjectHaveLatestRV(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestWatchDeleteEventObjectHaveLatestRV(ctx, t, s)
}

func TestWatchInitializationSignal(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunTestWatchInitializationSignal(ctx, t, s)
}

func TestProgressNotify(t *testing.T) {
	ctx, s := setup(t, serverOptions{progressNotify: time.Second})
	storagetesting.RunOptionalTestProgressNotify(ctx, t, s, s.increaseRV())
}

func TestWatchDispatchBookmarkEvents(t *testing.T) {
	ctx, s := setup(t, serverOptions{progressNotify: time.Second})
	storagetesting.RunTestWatchDispatchBookmarkEvents(ctx, t, s, false)
}

func TestSendInitialEventsBackwardCompatibility(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunSendInitialEventsBackwardCompatibility(ctx, t, s)
}

func TestEtcdWatchSemantics(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunWatchSemantics(ctx, t, s)
}

func TestEtcdWatchSemanticsWithConcurrentDecode(t *testing.T) {
	featuregatetesting.SetFeatureGateDuringTest(t, utilfeature.DefaultFeatureGate, features.ConcurrentWatchObjectDecode, true)
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunWatchSemantics(ctx, t, s)
}

func TestEtcdWatchSemanticInitialEventsExtended(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunWatchSemanticInitialEventsExtended(ctx, t, s)
}

func TestWatchListMatchSingle(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunWatchListMatchSingle(ctx, t, s)
}

func TestWatchErrorEventIsBlockingFurtherEvent(t *testing.T) {
	ctx, s := setup(t, serverOptions{})
	storagetesting.RunWatchErrorIsBlockingFurtherEvents(ctx, t, s)
}
