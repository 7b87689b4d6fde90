// The benchmark's HTTP app for the tableflip peer: the same behaviour as bench/apps/app.py.
//
// Built offline from Debian's packages (golang-go, golang-github-cloudflare-tableflip-dev) in
// GOPATH mode: GO111MODULE=off GOPATH=/usr/share/gocode go build -o tableflip-app .
//
// SIGHUP asks tableflip to upgrade: it re-executes this binary, which reads the version file
// (BENCH_VERSION_FILE) again, inherits the listener, and calls Ready(); the parent then drains.
// The upgrade's outcome is only logged here: the process that sent SIGHUP learns nothing.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"
)

// Same knobs as app.py: slow start, idle grace while draining, drain deadline.
const (
	slowStart      = 2 * time.Second
	drainIdleGrace = 1 * time.Second
	drainTimeout   = 20 * time.Second
)

type version struct {
	Generation int    `json:"generation"`
	Mode       string `json:"mode"`
}

func loadVersion() version {
	v := version{Mode: "ok"}
	path := os.Getenv("BENCH_VERSION_FILE")
	if path == "" {
		return v
	}
	data, err := os.ReadFile(path)
	if err != nil {
		log.Fatalln("read version file:", err)
	}
	if err := json.Unmarshal(data, &v); err != nil {
		log.Fatalln("parse version file:", err)
	}
	return v
}

func main() {
	listenAddr := flag.String("listen", "127.0.0.1:8080", "address to listen on")
	pidFile := flag.String("pid-file", "", "path to the pid file tableflip writes once ready")
	flag.Parse()
	log.SetPrefix(fmt.Sprintf("tableflip-app %d ", os.Getpid()))

	v := loadVersion()
	if v.Mode == "broken" {
		log.Printf("version %d is broken (mode=broken)", v.Generation)
		os.Exit(1)
	}
	upg, err := tableflip.New(tableflip.Options{PIDFile: *pidFile, UpgradeTimeout: 30 * time.Second})
	if err != nil {
		log.Fatalln(err)
	}
	defer upg.Stop()

	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGHUP)
		for range sig {
			if err := upg.Upgrade(); err != nil {
				log.Println("upgrade failed:", err)
			} else {
				log.Println("upgrade ok")
			}
		}
	}()
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
		upg.Stop()
	}()

	if v.Mode == "slow" {
		time.Sleep(slowStart)
	}
	ln, err := upg.Listen("tcp", *listenAddr)
	if err != nil {
		log.Fatalln("listen:", err)
	}
	var draining atomic.Bool
	pid := strconv.Itoa(os.Getpid())
	gen := strconv.Itoa(v.Generation)
	body := []byte(fmt.Sprintf("version %d pid %d\n", v.Generation, os.Getpid()))
	server := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Type", "text/plain")
		h.Set("X-Handoff-Generation", gen)
		h.Set("X-Handoff-Pid", pid)
		if draining.Load() {
			// The next request on a kept-alive connection learns it is the last one;
			// closing idle connections at once would race it.
			h.Set("Connection", "close")
		}
		w.Write(body)
	})}
	go server.Serve(ln)
	if err := upg.Ready(); err != nil {
		log.Fatalln("ready:", err)
	}
	<-upg.Exit()
	draining.Store(true)
	ln.Close() // our copy only: the next process holds its own
	time.Sleep(drainIdleGrace)
	ctx, cancel := context.WithTimeout(context.Background(), drainTimeout)
	defer cancel()
	server.Shutdown(ctx)
}
