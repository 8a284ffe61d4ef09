// Probe: what guest user code (CPL3, emulated-mode guest) can do with CPU state on this PVM host,
// and whether KVM_GET_XSAVE2/KVM_SET_XSAVE see and change the registers guest user code uses.
// ./ustate TEST   tests: pkru fsgs rng avx512 amx xsave
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#define MEMSZ (64ul<<20)
static inline uint32_t rdpkru_host(void){uint32_t a,d; __asm__ volatile(".byte 0x0f,0x01,0xee":"=a"(a),"=d"(d):"c"(0)); return a;}
static uint8_t *mem; static int vcpu; static struct kvm_run *run; static int kvm;
static int step(const char*what){
  if(ioctl(vcpu,KVM_RUN,0)<0){perror("run");return -1;}
  if(run->exit_reason==KVM_EXIT_IO){uint64_t v=0; memcpy(&v,(uint8_t*)run+run->io.data_offset,run->io.size);
    printf("%s: out 0x%x value 0x%llx (host pkru now %x)\n",what,run->io.port,(unsigned long long)v,rdpkru_host()); return run->io.port;}
  struct kvm_regs rr; ioctl(vcpu,KVM_GET_REGS,&rr);
  struct kvm_vcpu_events ev; ioctl(vcpu,KVM_GET_VCPU_EVENTS,&ev);
  if(run->exit_reason==KVM_EXIT_SHUTDOWN){printf("%s: shutdown (triple fault) rip 0x%llx exc inj=%d nr=%d\n",what,rr.rip,ev.exception.injected,ev.exception.nr);return -2;}
  if(run->exit_reason==KVM_EXIT_INTERNAL_ERROR){printf("%s: internal error %d rip 0x%llx\n",what,run->internal.suberror,rr.rip);return -3;}
  printf("%s: exit %d rip 0x%llx\n",what,run->exit_reason,rr.rip); return -4;
}
int main(int argc,char**argv){
  const char*test=argc>1?argv[1]:"pkru";
  kvm=open("/dev/kvm",O_RDWR|O_CLOEXEC); int vm=ioctl(kvm,KVM_CREATE_VM,0);
  ioctl(vm,KVM_SET_TSS_ADDR,0xfffbd000);
  mem=mmap(NULL,MEMSZ,PROT_READ|PROT_WRITE,MAP_SHARED|MAP_ANONYMOUS|MAP_NORESERVE,-1,0);
  struct kvm_userspace_memory_region r={.slot=0,.guest_phys_addr=0,.memory_size=MEMSZ,.userspace_addr=(unsigned long)mem};
  ioctl(vm,KVM_SET_USER_MEMORY_REGION,&r);
  uint64_t*gdt=(uint64_t*)(mem+0x500); gdt[0]=0; gdt[1]=0x00af9b000000ffffull; gdt[2]=0x00cf93000000ffffull; gdt[3]=0x008f8b000000ffffull;
  gdt[4]=0x00cff3000000ffffull; gdt[5]=0x00affb000000ffffull;
  uint64_t*pml4=(uint64_t*)(mem+0x9000),*pdpt=(uint64_t*)(mem+0xa000),*pd=(uint64_t*)(mem+0xb000);
  pml4[0]=0xa000|7; pdpt[0]=0xb000|7;
  for(int i=0;i<32;i++){ pd[i]=(i<<21)|0x87; }
  vcpu=ioctl(vm,KVM_CREATE_VCPU,0);
  run=mmap(NULL,ioctl(kvm,KVM_GET_VCPU_MMAP_SIZE,0),PROT_READ|PROT_WRITE,MAP_SHARED,vcpu,0);
  struct {struct kvm_cpuid2 c; struct kvm_cpuid_entry2 e[100];} cp={.c.nent=100};
  ioctl(kvm,KVM_GET_SUPPORTED_CPUID,&cp); ioctl(vcpu,KVM_SET_CPUID2,&cp);
  struct kvm_sregs s; ioctl(vcpu,KVM_GET_SREGS,&s);
  struct kvm_segment cs={.base=0,.limit=0xfffff,.selector=0x2b,.type=11,.present=1,.dpl=3,.s=1,.l=1,.g=1};
  struct kvm_segment ds={.base=0,.limit=0xfffff,.selector=0x23,.type=3,.present=1,.dpl=3,.db=1,.s=1,.g=1};
  struct kvm_segment tr={.base=0,.limit=0xfffff,.selector=0x18,.type=11,.present=1,.g=1};
  s.cs=cs; s.ds=s.es=s.fs=s.gs=s.ss=ds; s.tr=tr; s.gdt.base=0x500; s.gdt.limit=47;
  s.cr0=0x80000033; s.cr3=0x9000; s.cr4=0x20|0x600; s.efer=0x500;
  ioctl(vcpu,KVM_SET_SREGS,&s);
  uint8_t code[256]; size_t n=0;
#define E(...) do{uint8_t b[]={__VA_ARGS__}; memcpy(code+n,b,sizeof b); n+=sizeof b;}while(0)
  if(!strcmp(test,"pkru")){
    E(0x31,0xc9, 0x31,0xd2, 0xb8,0x0c,0,0,0, 0x0f,0x01,0xef);   // wrpkru(0xc)
    E(0x31,0xc9, 0x0f,0x01,0xee, 0xe7,0x80);                    // rdpkru; out 0x80
    E(0x31,0xc9, 0x0f,0x01,0xee, 0xe7,0x81, 0xf4);              // again after an exit
  } else if(!strcmp(test,"fsgs")){
    E(0x48,0xb8, 0,0x40,0x23,0x01,0,0,0,0);                     // mov rax,0x1234000
    E(0xf3,0x48,0x0f,0xae,0xd0);                                // wrfsbase rax
    E(0x31,0xc0, 0xf3,0x48,0x0f,0xae,0xc0, 0xe7,0x80);          // rdfsbase rax; out 0x80 (eax)
    E(0xf3,0x48,0x0f,0xae,0xc0, 0xe7,0x81, 0xf4);               // after an exit
  } else if(!strcmp(test,"rng")){
    E(0x48,0x0f,0xc7,0xf0, 0xe7,0x80);                          // rdrand rax; out
    E(0x48,0x0f,0xc7,0xf8, 0xe7,0x81, 0xf4);                    // rdseed rax; out
  } else if(!strcmp(test,"avx512")){
    E(0x62,0xf1,0x7d,0x48,0xef,0xc0);                           // vpxord zmm0,zmm0,zmm0
    E(0xe7,0x80);
    E(0xc4,0xe1,0xf8,0x90,0xc8);                                // kmovq k1,k0
    E(0xe7,0x81,0xf4);
  } else if(!strcmp(test,"amx")){
    // tile config at 0x4000: palette 1, 1 tile 16 rows x 64 bytes
    uint8_t cfg[64]={0}; cfg[0]=1; cfg[16]=64; cfg[48]=16; memcpy(mem+0x4000,cfg,64);
    E(0xc4,0xe2,0x78,0x49,0x04,0x25,0x00,0x40,0,0);             // ldtilecfg [0x4000]
    E(0xe7,0x80);
    E(0xc4,0xe2,0x7b,0x49,0xc0);                                // tilezero tmm0
    E(0xe7,0x81,0xf4);
  } else if(!strcmp(test,"xsave")){
    // ymm0 = 32 bytes of 0x5a from 0x4000; out 0x80; then read ymm0 back to 0x4100 and out 0x81
    memset(mem+0x4000,0x5a,32);
    E(0xc5,0xfe,0x6f,0x04,0x25,0x00,0x40,0,0);                  // vmovdqu ymm0,[0x4000]
    E(0xe7,0x80);
    E(0xc5,0xfe,0x7f,0x04,0x25,0x00,0x41,0,0);                  // vmovdqu [0x4100],ymm0
    E(0xe7,0x81,0xf4);
  }
  memcpy(mem+0x3000,code,n);
  struct kvm_regs g={0}; g.rip=0x3000; g.rsp=0x8000; g.rflags=2; ioctl(vcpu,KVM_SET_REGS,&g);
  printf("%s: host pkru before %x\n",test,rdpkru_host());
  int p=step(test);
  if(!strcmp(test,"xsave") && p==0x80){
    int sz=ioctl(kvm,KVM_CHECK_EXTENSION,KVM_CAP_XSAVE2); if(sz<4096) sz=4096;
    struct kvm_xsave*x=calloc(1,sz);
    if(ioctl(vcpu,KVM_GET_XSAVE2,x)<0) perror("get xsave2");
    uint8_t*b=(uint8_t*)x->region; uint64_t bv; memcpy(&bv,b+512,8);
    printf("xsave: size %d XSTATE_BV 0x%llx xmm0[0..4]=%02x%02x%02x%02x ymm0hi[0..4]=%02x%02x%02x%02x\n",sz,(unsigned long long)bv,b[160],b[161],b[162],b[163],b[576],b[577],b[578],b[579]);
    memset(b+576,0xa5,16); // change the upper half of ymm0
    if(ioctl(vcpu,KVM_SET_XSAVE,x)<0) perror("set xsave");
  }
  if(p>=0) step(test);
  if(!strcmp(test,"xsave")) printf("xsave: guest read back ymm0: lo %02x hi %02x\n",mem[0x4100],mem[0x4110]);
  if(!strcmp(test,"fsgs")){ ioctl(vcpu,KVM_GET_SREGS,&s); printf("fsgs: KVM_GET_SREGS fs.base=0x%llx\n",s.fs.base);}
  if(!strcmp(test,"pkru")){ struct {struct kvm_xsave x; uint8_t pad[16384];} xs; if(ioctl(vcpu,KVM_GET_XSAVE,&xs.x)==0){uint64_t bv; memcpy(&bv,(uint8_t*)xs.x.region+512,8); printf("pkru: XSTATE_BV 0x%llx\n",(unsigned long long)bv);} }
  return 0;
}
