// Command kstatus prints, for every Kubernetes object it reads (YAML or JSON,
// several documents, or a List such as `kubectl get -o json` prints), the
// verdict of the kstatus library (sigs.k8s.io/cli-utils/pkg/kstatus, what
// Flux and kpt wait on) and, with --argocd-lua, the verdict of an Argo CD
// Lua health check run by gopher-lua, the interpreter Argo CD embeds.
//
//	kubectl get mtj -n ns -o json | kstatus --argocd-lua health.lua
//	{"kind":"MoETrainingJob","namespace":"ns","name":"a","kstatus":{"status":"InProgress","message":"..."},"argocd":{"status":"Progressing","message":"..."}}
//
// kstatus test DIR runs Argo CD's own test layout (health_test.yaml beside
// health.lua, with testdata/) under DIR and fails on the first wrong verdict.
//
// It is a test-harness tool; the product is Rust.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	k8syaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
	"sigs.k8s.io/yaml"
)

type verdict struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

type line struct {
	Kind      string   `json:"kind"`
	Namespace string   `json:"namespace,omitempty"`
	Name      string   `json:"name"`
	Kstatus   verdict  `json:"kstatus"`
	ArgoCD    *verdict `json:"argocd,omitempty"`
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "test" {
		if len(os.Args) != 3 {
			fail(errors.New("usage: kstatus test DIR"))
		}
		n, err := runArgoTests(os.Args[2])
		if err != nil {
			fail(err)
		}
		fmt.Printf("kstatus test: %d Argo CD health verdicts right\n", n)
		return
	}
	luaPath := flag.String("argocd-lua", "", "Argo CD health.lua to run on every object as well")
	flag.Parse()
	var script string
	if *luaPath != "" {
		b, err := os.ReadFile(*luaPath)
		if err != nil {
			fail(err)
		}
		script = string(b)
	}
	objs, err := readObjects(os.Stdin)
	if err != nil {
		fail(err)
	}
	if len(objs) == 0 {
		fail(errors.New("no objects on stdin"))
	}
	out := json.NewEncoder(os.Stdout)
	for _, u := range objs {
		res, err := status.Compute(u)
		if err != nil {
			fail(fmt.Errorf("%s/%s: kstatus: %w", u.GetKind(), u.GetName(), err))
		}
		l := line{Kind: u.GetKind(), Namespace: u.GetNamespace(), Name: u.GetName(),
			Kstatus: verdict{Status: res.Status.String(), Message: res.Message}}
		if script != "" {
			v, err := argoHealth(script, u.Object)
			if err != nil {
				fail(fmt.Errorf("%s/%s: %s: %w", u.GetKind(), u.GetName(), *luaPath, err))
			}
			l.ArgoCD = &v
		}
		if err := out.Encode(l); err != nil {
			fail(err)
		}
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "kstatus:", err)
	os.Exit(1)
}

// readObjects decodes a YAML or JSON stream; Lists are expanded into their items.
func readObjects(r io.Reader) ([]*unstructured.Unstructured, error) {
	dec := k8syaml.NewYAMLOrJSONDecoder(bufio.NewReader(r), 4096)
	var objs []*unstructured.Unstructured
	for {
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			if errors.Is(err, io.EOF) {
				return objs, nil
			}
			return nil, err
		}
		// Integers stay int64, as the kstatus accessors require.
		var m map[string]interface{}
		if err := utiljson.Unmarshal(raw, &m); err != nil {
			return nil, err
		}
		if m == nil {
			continue // an empty document
		}
		u := &unstructured.Unstructured{Object: m}
		if u.IsList() {
			items, _, _ := unstructured.NestedSlice(m, "items")
			for _, it := range items {
				im, ok := it.(map[string]interface{})
				if !ok {
					return nil, fmt.Errorf("a List item is not an object")
				}
				objs = append(objs, &unstructured.Unstructured{Object: im})
			}
			continue
		}
		if u.GetKind() == "" {
			return nil, fmt.Errorf("an object without kind")
		}
		objs = append(objs, u)
	}
}

// argoHealth runs a health.lua as Argo CD does: the object is the global
// `obj` (JSON converted to Lua tables) and the script returns a table with
// `status` and `message`.
func argoHealth(script string, obj map[string]interface{}) (verdict, error) {
	L := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer L.Close()
	// The libraries Argo CD opens for a health check from argocd-cm (util/lua
	// runLua, without resource.customizations.useOpenLibs): package, base and
	// table (and a "safe" os, which these checks do not use). No string, no math.
	for _, lib := range []struct {
		name string
		fn   lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
	} {
		L.Push(L.NewFunction(lib.fn))
		L.Push(lua.LString(lib.name))
		L.Call(1, 0)
	}
	// Argo CD round-trips the object through JSON before converting it.
	b, err := json.Marshal(obj)
	if err != nil {
		return verdict{}, err
	}
	var v interface{}
	if err := json.Unmarshal(b, &v); err != nil {
		return verdict{}, err
	}
	L.SetGlobal("obj", toLua(L, v))
	if err := L.DoString(script); err != nil {
		return verdict{}, err
	}
	ret := L.Get(-1)
	t, ok := ret.(*lua.LTable)
	if !ok {
		return verdict{}, fmt.Errorf("the script returned %s, not a table", ret.Type())
	}
	st := t.RawGetString("status")
	if st.Type() != lua.LTString {
		return verdict{}, fmt.Errorf("the returned table has no status string")
	}
	switch st.String() {
	case "Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown":
	default:
		return verdict{}, fmt.Errorf("status %q is not an Argo CD health status", st.String())
	}
	msg := ""
	if m := t.RawGetString("message"); m.Type() == lua.LTString {
		msg = m.String()
	}
	return verdict{Status: st.String(), Message: msg}, nil
}

func toLua(L *lua.LState, v interface{}) lua.LValue {
	switch x := v.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(x)
	case float64:
		return lua.LNumber(x)
	case string:
		return lua.LString(x)
	case []interface{}:
		t := L.NewTable()
		for _, e := range x {
			t.Append(toLua(L, e))
		}
		return t
	case map[string]interface{}:
		t := L.NewTable()
		for k, e := range x {
			t.RawSetString(k, toLua(L, e))
		}
		return t
	default:
		panic(fmt.Sprintf("unexpected JSON value %T", v))
	}
}

// Argo CD's resource_customizations test layout.
type argoTests struct {
	Tests []struct {
		HealthStatus verdict `json:"healthStatus"`
		InputPath    string  `json:"inputPath"`
	} `json:"tests"`
}

func runArgoTests(root string) (int, error) {
	n := 0
	err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || d.Name() != "health_test.yaml" {
			return err
		}
		dir := filepath.Dir(path)
		script, err := os.ReadFile(filepath.Join(dir, "health.lua"))
		if err != nil {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		var tests argoTests
		if err := yaml.UnmarshalStrict(b, &tests); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		if len(tests.Tests) == 0 {
			return fmt.Errorf("%s: no tests", path)
		}
		for _, tc := range tests.Tests {
			in, err := os.ReadFile(filepath.Join(dir, tc.InputPath))
			if err != nil {
				return err
			}
			objs, err := readObjects(bytes.NewReader(in))
			if err != nil || len(objs) != 1 {
				return fmt.Errorf("%s: want one object (%v)", tc.InputPath, err)
			}
			got, err := argoHealth(string(script), objs[0].Object)
			if err != nil {
				return fmt.Errorf("%s: %w", tc.InputPath, err)
			}
			if got != tc.HealthStatus {
				return fmt.Errorf("%s: %s: got %s %q, want %s %q", dir, tc.InputPath,
					got.Status, got.Message, tc.HealthStatus.Status, tc.HealthStatus.Message)
			}
			n++
		}
		return nil
	})
	if err == nil && n == 0 {
		err = fmt.Errorf("no health_test.yaml under %s", strings.TrimSuffix(root, "/"))
	}
	return n, err
}
